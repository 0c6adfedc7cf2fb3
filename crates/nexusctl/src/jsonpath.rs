//! The subset of kubectl's JSONPath templates nexusctl understands:
//! `{.a.b}`, `{.items[0].metadata.name}`, `{.items[*].metadata.name}` and
//! literal text between expressions.

use serde_json::Value;

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(Vec<Part>);

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Path(Vec<Step>),
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
    All,
}

impl Template {
    /// Parses a template such as `{.status.phase}`.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(unescape(&rest[..open])));
            }
            let close = rest[open..].find('}').ok_or_else(|| format!("jsonpath {text:?}: unclosed '{{'"))? + open;
            parts.push(Part::Path(parse_path(&rest[open + 1..close]).map_err(|e| format!("jsonpath {text:?}: {e}"))?));
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(unescape(rest)));
        }
        if !parts.iter().any(|p| matches!(p, Part::Path(_))) {
            return Err(format!("jsonpath {text:?} has no expression; write it like {{.status.phase}}"));
        }
        Ok(Template(parts))
    }

    /// Renders the template; several matches are joined by spaces.
    pub fn render(&self, value: &Value) -> String {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Path(steps) => {
                    let found = select(value, steps);
                    let texts: Vec<String> = found.iter().map(|v| scalar(v)).collect();
                    out.push_str(&texts.join(" "));
                }
            }
        }
        out
    }

    /// The values the template's first expression selects.
    pub fn values<'a>(&self, value: &'a Value) -> Vec<&'a Value> {
        self.0
            .iter()
            .find_map(|p| match p {
                Part::Path(steps) => Some(select(value, steps)),
                Part::Text(_) => None,
            })
            .unwrap_or_default()
    }
}

fn unescape(s: &str) -> String {
    s.replace("\\n", "\n").replace("\\t", "\t")
}

fn parse_path(expr: &str) -> Result<Vec<Step>, String> {
    let expr = expr.trim();
    let expr = expr.strip_prefix('$').unwrap_or(expr);
    if expr.is_empty() || expr == "." {
        return Ok(Vec::new());
    }
    if !expr.starts_with('.') && !expr.starts_with('[') {
        return Err(format!("{expr:?} must start with '.'"));
    }
    let mut steps = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '.' => {
                let mut name = String::new();
                while let Some(&n) = chars.peek() {
                    if n == '.' || n == '[' {
                        break;
                    }
                    name.push(n);
                    chars.next();
                }
                if name.is_empty() {
                    return Err("empty field name".into());
                }
                steps.push(Step::Field(name));
            }
            '[' => {
                let mut inner = String::new();
                for n in chars.by_ref() {
                    if n == ']' {
                        break;
                    }
                    inner.push(n);
                }
                let inner = inner.trim().trim_matches('\'').trim_matches('"');
                steps.push(match inner {
                    "*" => Step::All,
                    i => match i.parse::<usize>() {
                        Ok(n) => Step::Index(n),
                        Err(_) => Step::Field(i.to_string()),
                    },
                });
            }
            other => return Err(format!("unexpected {other:?}")),
        }
    }
    Ok(steps)
}

fn select<'a>(value: &'a Value, steps: &[Step]) -> Vec<&'a Value> {
    let mut current = vec![value];
    for step in steps {
        let mut next = Vec::new();
        for v in current {
            match step {
                Step::Field(f) => {
                    if let Some(x) = v.get(f) {
                        next.push(x);
                    }
                }
                Step::Index(i) => {
                    if let Some(x) = v.get(*i) {
                        next.push(x);
                    }
                }
                Step::All => match v {
                    Value::Array(a) => next.extend(a.iter()),
                    Value::Object(o) => next.extend(o.values()),
                    _ => {}
                },
            }
        }
        current = next;
    }
    current
}

/// A value as text: strings bare, everything else as JSON.
pub fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn templates_select_fields_indexes_and_wildcards() {
        let v = json!({"items": [{"metadata": {"name": "a"}}, {"metadata": {"name": "b"}}], "status": {"phase": "Running"}});
        assert_eq!(Template::parse("{.status.phase}").unwrap().render(&v), "Running");
        assert_eq!(Template::parse("{.items[*].metadata.name}").unwrap().render(&v), "a b");
        assert_eq!(Template::parse("name={.items[1].metadata.name}\\n").unwrap().render(&v), "name=b\n");
        assert_eq!(Template::parse("{.missing}").unwrap().render(&v), "");
        assert!(Template::parse("status.phase").is_err());
        assert!(Template::parse("{.a").is_err());
    }
}
