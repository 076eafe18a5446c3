//! Rendering a parsed template for one recipient: expressions evaluated over the
//! layered substitution data and the loop frames, values written escaped for where
//! they appear.

use std::fmt::Write as _;

use serde_json::Value;

use super::{Cmp, Escape, Expr, Node, RenderError, Scope, Step};

/// Renders parsed nodes over `scope` into `out`.
pub(super) fn render(
    nodes: &[Node],
    scope: Scope<'_>,
    out: &mut String,
) -> Result<(), RenderError> {
    let mut frames = Vec::new();
    render_nodes(nodes, scope, &mut frames, out)
}

/// A loop in progress: its element and position.
struct Frame<'v> {
    var: &'v Value,
    index: usize,
}

/// An evaluated value: borrowed from the data, or made by the template.
enum Val<'v> {
    Ref(&'v Value),
    Owned(Value),
    Missing,
}

impl Val<'_> {
    fn value(&self) -> Option<&Value> {
        match self {
            Val::Ref(v) => Some(v),
            Val::Owned(v) => Some(v),
            Val::Missing => None,
        }
    }

    fn truthy(&self) -> bool {
        match self.value() {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
        }
    }
}

fn render_nodes<'v>(
    nodes: &'v [Node],
    scope: Scope<'v>,
    frames: &mut Vec<Frame<'v>>,
    out: &mut String,
) -> Result<(), RenderError> {
    for node in nodes {
        match node {
            Node::Text(text) => out.push_str(text),
            Node::Value { expr, escape } => {
                let val = eval(expr, scope, frames)?;
                if let Some(value) = val.value() {
                    write_value(value, *escape, out);
                }
            }
            Node::If {
                branches,
                otherwise,
            } => {
                let mut taken = None;
                for (cond, body) in branches {
                    if eval(cond, scope, frames)?.truthy() {
                        taken = Some(body);
                        break;
                    }
                }
                render_nodes(taken.unwrap_or(otherwise), scope, frames, out)?;
            }
            Node::Each { expr, body } => {
                let items: &'v [Value] = match eval(expr, scope, frames)? {
                    Val::Missing | Val::Ref(Value::Null) => continue,
                    Val::Ref(Value::Array(items)) => items,
                    Val::Ref(other) => {
                        return Err(RenderError(format!(
                            "each needs an array, found {}",
                            kind(other)
                        )));
                    }
                    Val::Owned(_) => {
                        return Err(RenderError("each needs an array, found a literal".into()));
                    }
                };
                for (index, var) in items.iter().enumerate() {
                    frames.push(Frame { var, index });
                    let result = render_nodes(body, scope, frames, out);
                    frames.pop();
                    result?;
                }
            }
        }
    }
    Ok(())
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn eval<'v>(
    expr: &'v Expr,
    scope: Scope<'v>,
    frames: &[Frame<'v>],
) -> Result<Val<'v>, RenderError> {
    Ok(match expr {
        Expr::Literal(value) => Val::Ref(value),
        Expr::Path(steps) => lookup(steps, scope, frames)?,
        Expr::Not(inner) => Val::Owned(Value::Bool(!eval(inner, scope, frames)?.truthy())),
        Expr::And(a, b) => {
            let left = eval(a, scope, frames)?;
            if !left.truthy() {
                Val::Owned(Value::Bool(false))
            } else {
                Val::Owned(Value::Bool(eval(b, scope, frames)?.truthy()))
            }
        }
        Expr::Or(a, b) => {
            let left = eval(a, scope, frames)?;
            if left.truthy() {
                left
            } else {
                eval(b, scope, frames)?
            }
        }
        Expr::Compare(cmp, a, b) => {
            let left = eval(a, scope, frames)?;
            let right = eval(b, scope, frames)?;
            Val::Owned(Value::Bool(compare(*cmp, left.value(), right.value())))
        }
    })
}

fn lookup<'v>(
    steps: &'v [Step],
    scope: Scope<'v>,
    frames: &[Frame<'v>],
) -> Result<Val<'v>, RenderError> {
    let Some(Step::Key(first)) = steps.first() else {
        return Ok(Val::Missing);
    };
    let mut current: &'v Value = match (first.as_str(), frames.last()) {
        ("loop_var", Some(frame)) => frame.var,
        ("loop_index", Some(frame)) => {
            if steps.len() > 1 {
                return Ok(Val::Missing);
            }
            return Ok(Val::Owned(Value::from(frame.index)));
        }
        _ => match scope.layers.iter().find_map(|layer| layer.get(first)) {
            Some(value) => value,
            None => return Ok(Val::Missing),
        },
    };
    for step in &steps[1..] {
        current = match (step, current) {
            (Step::Key(key), Value::Object(map)) => match map.get(key) {
                Some(value) => value,
                None => return Ok(Val::Missing),
            },
            (Step::Key(_), _) => return Ok(Val::Missing),
            (Step::Index(i), Value::Array(items)) => match items.get(*i) {
                Some(value) => value,
                None => return Ok(Val::Missing),
            },
            (Step::Index(i), other) => {
                return Err(RenderError(format!(
                    "[{}] needs an array, found {}",
                    i + 1,
                    kind(other)
                )));
            }
        };
    }
    Ok(Val::Ref(current))
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        _ => None,
    }
}

fn compare(cmp: Cmp, a: Option<&Value>, b: Option<&Value>) -> bool {
    use std::cmp::Ordering;
    let a = a.unwrap_or(&Value::Null);
    let b = b.unwrap_or(&Value::Null);
    let order: Option<Ordering> = match (a, b) {
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        (Value::Null, _) | (_, Value::Null) => None,
        (Value::Number(_), _) | (_, Value::Number(_)) => match (number(a), number(b)) {
            (Some(x), Some(y)) => x.partial_cmp(&y),
            _ => None,
        },
        _ => (a == b).then_some(Ordering::Equal),
    };
    match (cmp, order) {
        (Cmp::Eq, order) => order == Some(Ordering::Equal),
        (Cmp::Ne, order) => order != Some(Ordering::Equal),
        (_, None) => false,
        (Cmp::Lt, Some(o)) => o == Ordering::Less,
        (Cmp::Gt, Some(o)) => o == Ordering::Greater,
        (Cmp::Le, Some(o)) => o != Ordering::Greater,
        (Cmp::Ge, Some(o)) => o != Ordering::Less,
    }
}

fn write_value(value: &Value, escape: Escape, out: &mut String) {
    match value {
        Value::Null => {}
        Value::String(s) => write_escaped(s, escape, out),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        other => write_escaped(&other.to_string(), escape, out),
    }
}

fn write_escaped(text: &str, escape: Escape, out: &mut String) {
    match escape {
        Escape::None => out.push_str(text),
        Escape::Html => {
            for c in text.chars() {
                match c {
                    '&' => out.push_str("&amp;"),
                    '<' => out.push_str("&lt;"),
                    '>' => out.push_str("&gt;"),
                    '"' => out.push_str("&quot;"),
                    '\'' => out.push_str("&#39;"),
                    c => out.push(c),
                }
            }
        }
        Escape::Url => {
            for &b in text.as_bytes() {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                    out.push(b as char);
                } else {
                    let _ = write!(out, "%{b:02X}");
                }
            }
        }
    }
}
