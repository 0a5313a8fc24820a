//! `{{name}}` templates, compiled once when the scenario loads and rendered per request
//! into a reused buffer: no parsing on the hot path.

use std::collections::HashMap;
use std::sync::Arc;

/// Names of every variable a scenario may use, each with a slot number.
#[derive(Debug, Default, Clone)]
pub struct VarTable {
    names: Vec<String>,
    index: HashMap<String, usize>,
}

impl VarTable {
    pub fn slot(&mut self, name: &str) -> usize {
        if let Some(&slot) = self.index.get(name) {
            return slot;
        }
        let slot = self.names.len();
        self.names.push(name.to_owned());
        self.index.insert(name.to_owned(), slot);
        slot
    }

    pub fn get(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    pub fn name(&self, slot: usize) -> &str {
        &self.names[slot]
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// One session's variable values, by slot. Values are shared, so copying a session's
/// starting values is a reference-count bump per slot.
pub type Values = Vec<Option<Arc<str>>>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(String),
    Var(usize),
}

/// How substituted values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// As they are (paths, headers).
    None,
    /// As the inside of a JSON string (bodies).
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    segs: Vec<Seg>,
    escape: Escape,
}

#[derive(Debug, PartialEq, Eq)]
pub enum TemplateError {
    Unclosed { at: usize },
    EmptyName { at: usize },
    Unknown { name: String },
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateError::Unclosed { at } => write!(f, "`{{{{` at byte {at} is never closed"),
            TemplateError::EmptyName { at } => write!(f, "empty `{{{{}}}}` at byte {at}"),
            TemplateError::Unknown { name } => write!(
                f,
                "unknown variable `{name}` (not built in, not a CSV column, not extracted by an earlier step)"
            ),
        }
    }
}

impl std::error::Error for TemplateError {}

impl Template {
    /// Compiles `src`; every `{{name}}` must already be known to `known`.
    pub fn compile(src: &str, known: &VarTable, escape: Escape) -> Result<Self, TemplateError> {
        let mut segs = Vec::new();
        let mut rest = src;
        let mut offset = 0;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                segs.push(Seg::Lit(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or(TemplateError::Unclosed { at: offset + open })?;
            let name = after[..close].trim();
            if name.is_empty() {
                return Err(TemplateError::EmptyName { at: offset + open });
            }
            let slot = known.get(name).ok_or_else(|| TemplateError::Unknown {
                name: name.to_owned(),
            })?;
            segs.push(Seg::Var(slot));
            let consumed = open + 2 + close + 2;
            offset += consumed;
            rest = &rest[consumed..];
        }
        if !rest.is_empty() {
            segs.push(Seg::Lit(rest.to_owned()));
        }
        Ok(Template { segs, escape })
    }

    /// The text when it has no variables, so a request can be built once.
    pub fn as_static(&self) -> Option<&str> {
        match self.segs.as_slice() {
            [] => Some(""),
            [Seg::Lit(text)] => Some(text),
            _ => None,
        }
    }

    /// Slots this template reads.
    pub fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.segs.iter().filter_map(|seg| match seg {
            Seg::Var(slot) => Some(*slot),
            Seg::Lit(_) => None,
        })
    }

    /// Appends the rendering to `out`. `Err(slot)` names a variable that has no value in
    /// this session (for example an `order_id` that an earlier step did not get).
    /// The template with every variable as one plain letter: the part the scenario
    /// spells itself, to check before any variable has a value.
    pub fn literal_shape(&self) -> String {
        self.segs
            .iter()
            .map(|seg| match seg {
                Seg::Lit(text) => text.as_str(),
                Seg::Var(_) => "x",
            })
            .collect()
    }

    pub fn render(&self, values: &Values, out: &mut String) -> Result<(), usize> {
        for seg in &self.segs {
            match seg {
                Seg::Lit(text) => out.push_str(text),
                Seg::Var(slot) => {
                    let value = values.get(*slot).and_then(|v| v.as_deref()).ok_or(*slot)?;
                    match self.escape {
                        Escape::None => out.push_str(value),
                        Escape::Json => json_escape_into(value, out),
                    }
                }
            }
        }
        Ok(())
    }
}

fn json_escape_into(value: &str, out: &mut String) {
    for ch in value.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
}

/// Reads the value at a JSON pointer (`/order_id`, `/orders/0/order_id`) as text:
/// strings as they are, numbers and booleans as written.
pub fn extract(body: &serde_json::Value, pointer: &str) -> Option<Arc<str>> {
    match body.pointer(pointer)? {
        serde_json::Value::String(s) => Some(Arc::from(s.as_str())),
        serde_json::Value::Number(n) => Some(Arc::from(n.to_string())),
        serde_json::Value::Bool(b) => Some(Arc::from(b.to_string())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(names: &[&str]) -> VarTable {
        let mut table = VarTable::default();
        for name in names {
            table.slot(name);
        }
        table
    }

    #[test]
    fn renders_literals_and_variables() {
        let vars = table(&["sale_id", "user"]);
        let t = Template::compile(
            "/v1/flash-sales/{{sale_id}}/purchase?u={{ user }}",
            &vars,
            Escape::None,
        )
        .unwrap();
        let values: Values = vec![Some("sale_1".into()), Some("u-7".into())];
        let mut out = String::new();
        t.render(&values, &mut out).unwrap();
        assert_eq!(out, "/v1/flash-sales/sale_1/purchase?u=u-7");
        assert_eq!(t.as_static(), None);
        assert_eq!(t.slots().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn static_templates_are_recognised() {
        let t = Template::compile("/healthz", &VarTable::default(), Escape::None).unwrap();
        assert_eq!(t.as_static(), Some("/healthz"));
        let empty = Template::compile("", &VarTable::default(), Escape::None).unwrap();
        assert_eq!(empty.as_static(), Some(""));
    }

    #[test]
    fn json_bodies_escape_substitutions() {
        let vars = table(&["note"]);
        let t = Template::compile(r#"{"note":"{{note}}"}"#, &vars, Escape::Json).unwrap();
        let mut out = String::new();
        t.render(&vec![Some("say \"hi\"\\\n".into())], &mut out)
            .unwrap();
        assert_eq!(out, r#"{"note":"say \"hi\"\\\n"}"#);
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed["note"], "say \"hi\"\\\n");
    }

    #[test]
    fn a_missing_value_names_its_slot() {
        let vars = table(&["user", "order_id"]);
        let t = Template::compile("/v1/orders/{{order_id}}/pay", &vars, Escape::None).unwrap();
        let mut out = String::new();
        assert_eq!(t.render(&vec![Some("u".into()), None], &mut out), Err(1));
    }

    #[test]
    fn bad_templates_are_refused_with_a_reason() {
        let vars = table(&["user"]);
        assert_eq!(
            Template::compile("/a/{{user", &vars, Escape::None),
            Err(TemplateError::Unclosed { at: 3 })
        );
        assert_eq!(
            Template::compile("/a/{{ }}", &vars, Escape::None),
            Err(TemplateError::EmptyName { at: 3 })
        );
        let err = Template::compile("/a/{{nope}}", &vars, Escape::None).unwrap_err();
        assert_eq!(
            err,
            TemplateError::Unknown {
                name: "nope".into()
            }
        );
        assert!(err.to_string().contains("nope"));
    }

    #[test]
    fn extraction_reads_json_pointers() {
        let body = serde_json::json!({"order_id": "ord_1", "quantity": 2, "orders": [{"order_id": "ord_9"}], "ok": true});
        assert_eq!(extract(&body, "/order_id").as_deref(), Some("ord_1"));
        assert_eq!(extract(&body, "/quantity").as_deref(), Some("2"));
        assert_eq!(
            extract(&body, "/orders/0/order_id").as_deref(),
            Some("ord_9")
        );
        assert_eq!(extract(&body, "/ok").as_deref(), Some("true"));
        assert_eq!(extract(&body, "/missing"), None);
        assert_eq!(extract(&body, "/orders"), None);
    }
}
