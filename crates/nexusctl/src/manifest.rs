//! Reading objects from YAML or JSON files, directories and stdin.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// One object read from a file, with where it came from.
#[derive(Debug, Clone)]
pub struct Document {
    pub source: String,
    /// 1-based index of the document within its file.
    pub index: usize,
    pub value: Value,
}

/// Reads every document of `path`: a file, a directory (recursively, `.yaml`,
/// `.yml` and `.json` files in name order) or `-` for stdin.
pub fn read(path: &str) -> Result<Vec<Document>, String> {
    if path == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(|e| format!("reading stdin: {e}"))?;
        return parse("<stdin>", &text);
    }
    let p = Path::new(path);
    if p.is_dir() {
        let mut files = Vec::new();
        collect(p, &mut files).map_err(|e| format!("reading directory {path}: {e}"))?;
        files.sort();
        let mut docs = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| format!("reading {}: {e}", f.display()))?;
            docs.extend(parse(&f.display().to_string(), &text)?);
        }
        return Ok(docs);
    }
    let text = std::fs::read_to_string(p).map_err(|e| format!("reading {path}: {e}"))?;
    parse(path, &text)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json") {
            out.push(path);
        }
    }
    Ok(())
}

/// Parses a multi-document YAML (or JSON) text; empty documents are skipped.
pub fn parse(source: &str, text: &str) -> Result<Vec<Document>, String> {
    let options = serde_saphyr::options! { strict_booleans: true };
    let values: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| format!("{source}: {e}"))?;
    Ok(values
        .into_iter()
        .filter(|v| !v.is_null())
        .enumerate()
        .map(|(i, value)| Document { source: source.to_string(), index: i + 1, value })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_yields_each_object_and_keeps_yes_a_string() {
        let docs = parse("t.yaml", "a: 1\n---\nb: yes\n---\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].value["b"], Value::String("yes".into()));
        assert_eq!(docs[1].index, 2);
    }

    #[test]
    fn parse_errors_name_the_file() {
        let err = parse("bad.yaml", "a: [1,\n").unwrap_err();
        assert!(err.starts_with("bad.yaml"), "{err}");
    }
}
