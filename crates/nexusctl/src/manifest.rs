//! Reading objects from YAML or JSON files, directories and stdin, with
//! errors that name the file, the document, the line and column and the field.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::kinds::{self, KindInfo};

/// One object read from a file, with where it came from.
#[derive(Debug, Clone)]
pub struct Document {
    pub source: String,
    /// 1-based index of the document within its file.
    pub index: usize,
    pub value: Value,
}

impl Document {
    /// `file (document N)`, for messages.
    pub fn origin(&self) -> String {
        format!("{} (document {})", self.source, self.index)
    }
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

/// Splits a YAML stream into documents: (first line, 0-based; text).
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") || line == "..." {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 1;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    docs
}

/// Parses a multi-document YAML (or JSON) text. Each document is checked
/// against its kind's type, so an unknown or mistyped field is reported
/// with its line, column and path. Empty documents are skipped.
pub fn parse(source: &str, text: &str) -> Result<Vec<Document>, String> {
    let options = || serde_saphyr::options! { strict_booleans: true };
    let mut docs = Vec::new();
    for (first_line, chunk) in split_documents(text) {
        if chunk.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
            continue;
        }
        let index = docs.len() + 1;
        // A document is parsed on its own (parsing each one after as many
        // blank lines as precede it made a long stream quadratic); only
        // when it is refused is it parsed again so padded, so the error's
        // line numbers are the file's.
        let padded = || format!("{}{chunk}", "\n".repeat(first_line));
        let value: Value = match serde_saphyr::from_str_with_options(&chunk, options()) {
            Ok(value) => value,
            Err(e) => {
                let e = serde_saphyr::from_str_with_options::<Value>(&padded(), options()).err().unwrap_or(e);
                return Err(format!("{source} (document {index}): {}", rename_input(&e.to_string(), source)));
            }
        };
        if !value.is_object() {
            return Err(format!(
                "{source} (document {index}): expected an object with apiVersion, kind, metadata and spec"
            ));
        }
        if let Some(kind) = value["kind"].as_str().and_then(kinds::lookup)
            && kinds::check_yaml(kind, &chunk, options()).is_err()
            && let Err(e) = kinds::check_yaml(kind, &padded(), options())
        {
            let field = kinds::rejected_field(kind, &value).map(|p| format!("field {p}: ")).unwrap_or_default();
            return Err(format!("{source} (document {index}): {field}{}", rename_input(&e, source)));
        }
        docs.push(Document { source: source.to_string(), index, value });
    }
    Ok(docs)
}

fn rename_input(message: &str, source: &str) -> String {
    message.strip_prefix("error: ").unwrap_or(message).replace("<input>", source)
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
    fn errors_name_the_file_document_line_column_and_field() {
        let text = "kind: VM\napiVersion: nexus/v1\nmetadata: {name: a}\nspec: {vcpu: 1, memMib: 1, kernel: /k, rootfs: /r}\n---\n\
                    apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: b\nspec:\n  vcpu: 1\n  memMib: 128\n  kernel: /k\n  rootfs: /r\n  memory: 5\n";
        let err = parse("vms.yaml", text).unwrap_err();
        assert!(err.starts_with("vms.yaml (document 2): field spec.memory: "), "{err}");
        assert!(err.contains("line 15 column 3"), "{err}");
        assert!(err.contains("unknown field `memory`"), "{err}");
    }

    #[test]
    fn parse_error_output() {
        let text = "apiVersion: nexus/v1\nkind: VM\nmetadata:\n  name: web\nspec:\n  vcpu: many\n  memMib: 128\n  kernel: /k\n  rootfs: /r\n";
        insta::assert_snapshot!("parse_error", parse("web.yaml", text).unwrap_err());
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let err = parse("bad.yaml", "a: [1,\n").unwrap_err();
        assert!(err.starts_with("bad.yaml (document 1)"), "{err}");
    }

    #[test]
    fn a_syntax_error_in_a_later_document_gives_the_files_line() {
        let err = parse("bad.yaml", "a: 1\n---\nb: 2\n---\nc: 3\nd: [1,\n").unwrap_err();
        assert!(err.starts_with("bad.yaml (document 3)"), "{err}");
        assert!(err.contains("line 6"), "{err}");
    }
}

/// Annotation holding the last applied configuration (JSON).
pub const LAST_APPLIED: &str = "nexus.dev/last-applied";

/// A document resolved to its kind, project and name, reduced to the
/// fields a user owns.
#[derive(Debug, Clone)]
pub struct Target {
    pub kind: &'static KindInfo,
    pub project: String,
    pub name: String,
    pub desired: Value,
}

impl Target {
    pub fn from_doc(doc: &Document, default_project: &str) -> Result<Target, String> {
        let v = &doc.value;
        let kind_name = v["kind"].as_str().ok_or("missing field `kind`")?;
        let kind = kinds::resolve(kind_name)?;
        let name = v["metadata"]["name"].as_str().ok_or("missing field `metadata.name`")?.to_string();
        let mut desired = clean(v);
        let project = if kind.namespaced {
            let p = v["metadata"]["project"].as_str().unwrap_or(default_project).to_string();
            desired["metadata"]["project"] = json!(p);
            p
        } else {
            String::new()
        };
        Ok(Target { kind, project, name, desired })
    }

    /// `vm/web-1`.
    pub fn label(&self) -> String {
        format!("{}/{}", self.kind.short(), self.name)
    }
}

/// Keeps apiVersion, kind, spec and the user-owned metadata.
pub fn clean(v: &Value) -> Value {
    let mut meta = Map::new();
    for k in ["name", "project", "labels", "annotations", "ownerReferences"] {
        if let Some(x) = v["metadata"].get(k) {
            meta.insert(k.to_string(), x.clone());
        }
    }
    if let Some(Value::Object(a)) = meta.get_mut("annotations") {
        a.remove(LAST_APPLIED);
        if a.is_empty() {
            meta.remove("annotations");
        }
    }
    json!({"apiVersion": v["apiVersion"], "kind": v["kind"], "metadata": meta, "spec": v["spec"]})
}
