//! SparkPost's template language: compiled once per transmission, rendered per
//! recipient.
//!
//! - `{{ expr }}` substitutes a value: HTML-escaped in HTML parts, percent-encoded
//!   inside an HTML `href` attribute, as is in text and headers; `{{{ expr }}}` is
//!   never escaped (a whole link in an `href` must use it).
//! - Values: `name`, paths `a.b.c`, array elements `a[1]` (1-based), string literals
//!   `'x'` or `"x"`, numbers, `true`, `false`, `null`.
//! - `a or b` is the first truthy operand (so `{{ name or 'friend' }}` is a default);
//!   `a and b`, `not a`, comparisons `== != < > <= >=`, parentheses.
//! - Blocks: `{{ if c }}…{{ elseif d }}…{{ else }}…{{ end }}` and
//!   `{{ each arr }}…{{ end }}`, where `loop_var` is the element and `loop_index` its
//!   position from 0; loops nest, the innermost wins.
//! - Falsy: missing, null, false, 0, "", empty array or object.
//! - A missing value renders as nothing; `each` over something that is not an array,
//!   or an index into something that is not one, fails the recipient's rendering.

mod parse;
mod render;

use serde_json::{Map, Value};

/// How substituted values are escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    None,
    Html,
    Url,
}

/// The kind of content a template renders, which decides the default escaping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Text parts and header values: nothing is escaped.
    Text,
    /// HTML and AMP parts.
    Html,
}

/// A template that could not be parsed: what is wrong and on which line (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

/// A recipient for whom the template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(pub String);

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    Value {
        expr: Expr,
        escape: Escape,
    },
    If {
        branches: Vec<(Expr, Vec<Node>)>,
        otherwise: Vec<Node>,
    },
    Each {
        expr: Expr,
        body: Vec<Node>,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Path(Vec<Step>),
    Literal(Value),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Compare(Cmp, Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    /// 0-based (the source says 1-based).
    Index(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

/// A compiled template.
#[derive(Debug, Clone)]
pub struct Template {
    nodes: Vec<Node>,
    /// No substitutions at all: rendering is a copy.
    literal: Option<String>,
}

/// The substitution data of one recipient: top-level names are looked up in each
/// layer in order (recipient substitution_data, transmission substitution_data,
/// recipient metadata, transmission metadata).
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub layers: &'a [&'a Map<String, Value>],
}

/// A scope serializes as one object: the union of its layers, the first layer
/// that has a name winning (how Jinja templates see substitution data).
impl serde::Serialize for Scope<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        for (i, layer) in self.layers.iter().enumerate() {
            for (key, value) in layer.iter() {
                if !self.layers[..i].iter().any(|l| l.contains_key(key)) {
                    map.serialize_entry(key, value)?;
                }
            }
        }
        map.end()
    }
}

impl Template {
    pub fn parse(source: &str, flavor: Flavor) -> Result<Template, ParseError> {
        let nodes = parse::parse(source, flavor)?;
        let literal = match nodes.as_slice() {
            [] => Some(String::new()),
            [Node::Text(text)] => Some(text.clone()),
            _ => None,
        };
        Ok(Template { nodes, literal })
    }

    /// A template that is its text: nothing in it is substituted.
    pub fn literal(text: &str) -> Template {
        Template {
            nodes: vec![Node::Text(text.to_string())],
            literal: Some(text.to_string()),
        }
    }

    /// True when the template substitutes nothing.
    pub fn is_literal(&self) -> bool {
        self.literal.is_some()
    }

    pub fn render(&self, scope: Scope<'_>, out: &mut String) -> Result<(), RenderError> {
        if let Some(text) = &self.literal {
            out.push_str(text);
            return Ok(());
        }
        render::render(&self.nodes, scope, out)
    }

    pub fn render_to_string(&self, scope: Scope<'_>) -> Result<String, RenderError> {
        let mut out = String::new();
        self.render(scope, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Cases {
        case: Vec<Case>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Case {
        name: String,
        template: String,
        #[serde(default)]
        flavor: Option<String>,
        #[serde(default)]
        data: Option<String>,
        #[serde(default)]
        layers: Vec<String>,
        #[serde(default)]
        expect: Option<String>,
        #[serde(default)]
        parse_error: Option<String>,
        #[serde(default)]
        render_error: Option<String>,
    }

    fn object(json: &str, name: &str) -> Map<String, Value> {
        match serde_json::from_str(json) {
            Ok(Value::Object(map)) => map,
            other => panic!("{name}: data must be a JSON object, got {other:?}"),
        }
    }

    #[test]
    fn data_driven_cases() {
        let cases: Cases = toml::from_str(include_str!("cases.toml")).expect("cases parse");
        assert!(cases.case.len() > 40);
        for case in &cases.case {
            let name = &case.name;
            let flavor = match case.flavor.as_deref() {
                None | Some("text") => Flavor::Text,
                Some("html") => Flavor::Html,
                Some(other) => panic!("{name}: unknown flavor {other}"),
            };
            let mut maps: Vec<Map<String, Value>> =
                case.layers.iter().map(|l| object(l, name)).collect();
            if let Some(data) = &case.data {
                maps.push(object(data, name));
            }
            let layers: Vec<&Map<String, Value>> = maps.iter().collect();
            let scope = Scope { layers: &layers };
            let parsed = Template::parse(&case.template, flavor);
            if let Some(expected) = &case.parse_error {
                let err = parsed.expect_err(name).to_string();
                assert!(
                    err.contains(expected.as_str()),
                    "{name}: error {err:?} lacks {expected:?}"
                );
                continue;
            }
            let template = parsed.unwrap_or_else(|e| panic!("{name}: {e}"));
            let rendered = template.render_to_string(scope);
            if let Some(expected) = &case.render_error {
                let err = rendered.expect_err(name).to_string();
                assert!(
                    err.contains(expected.as_str()),
                    "{name}: error {err:?} lacks {expected:?}"
                );
                continue;
            }
            let expected = case
                .expect
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: no expectation"));
            assert_eq!(
                &rendered.unwrap_or_else(|e| panic!("{name}: {e}")),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn literal_templates_copy_their_text() {
        let t = Template::parse("no tags", Flavor::Html).unwrap();
        assert!(t.is_literal());
        let t = Template::literal("{{ kept }}");
        assert_eq!(
            t.render_to_string(Scope { layers: &[] }).unwrap(),
            "{{ kept }}"
        );
    }

    #[test]
    fn deep_nesting_is_refused() {
        let source = "{{ if a }}".repeat(100) + &"{{ end }}".repeat(100);
        let err = Template::parse(&source, Flavor::Text).unwrap_err();
        assert!(err.message.contains("nested too deeply"), "{err}");
    }
}
