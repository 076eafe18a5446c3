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

use std::fmt::Write as _;

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
        let mut parser = Parser {
            src: source,
            pos: 0,
            flavor,
            href: HrefState::default(),
        };
        let (nodes, end) = parser.block(0)?;
        if let Some(end) = end {
            return Err(parser.error_at(end.at, format!("unexpected {{{{ {} }}}}", end.word)));
        }
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
        let mut frames = Vec::new();
        render_nodes(&self.nodes, scope, &mut frames, out)
    }

    pub fn render_to_string(&self, scope: Scope<'_>) -> Result<String, RenderError> {
        let mut out = String::new();
        self.render(scope, &mut out)?;
        Ok(out)
    }
}

/// Where the parser is relative to an HTML `href` attribute value.
#[derive(Debug, Default, Clone, Copy)]
enum HrefState {
    #[default]
    Outside,
    /// Inside `href="…"` (or with `'`): the closing quote.
    Inside(u8),
}

impl HrefState {
    /// Follows literal HTML text.
    fn advance(&mut self, text: &str) {
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            match *self {
                HrefState::Inside(quote) => {
                    if bytes[i] == quote {
                        *self = HrefState::Outside;
                    }
                    i += 1;
                }
                HrefState::Outside => {
                    if bytes.len() - i >= 4 && bytes[i..i + 4].eq_ignore_ascii_case(b"href") {
                        let mut j = i + 4;
                        while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                            j += 1;
                        }
                        if j < bytes.len() && bytes[j] == b'=' {
                            j += 1;
                            while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                                j += 1;
                            }
                            if j < bytes.len() && (bytes[j] == b'"' || bytes[j] == b'\'') {
                                *self = HrefState::Inside(bytes[j]);
                                i = j + 1;
                                continue;
                            }
                        }
                    }
                    i += 1;
                }
            }
        }
    }
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    flavor: Flavor,
    href: HrefState,
}

/// A block-closing tag met while parsing a block.
struct Closer {
    word: &'static str,
    at: usize,
    /// The condition of an `elseif`.
    cond: Option<Expr>,
}

impl Parser<'_> {
    fn line_of(&self, at: usize) -> usize {
        1 + self.src[..at.min(self.src.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
    }

    fn error_at(&self, at: usize, message: String) -> ParseError {
        ParseError {
            line: self.line_of(at),
            message,
        }
    }

    /// Parses nodes until the end of the source or a closing tag (`elseif`, `else`,
    /// `end`), which is returned. `depth` bounds nesting.
    fn block(&mut self, depth: usize) -> Result<(Vec<Node>, Option<Closer>), ParseError> {
        if depth > 64 {
            return Err(self.error_at(self.pos, "blocks nested too deeply".into()));
        }
        let mut nodes = Vec::new();
        loop {
            let rest = &self.src[self.pos..];
            let Some(open) = rest.find("{{") else {
                self.text(&mut nodes, rest.len());
                return Ok((nodes, None));
            };
            self.text(&mut nodes, open);
            let at = self.pos;
            let triple = self.src[at..].starts_with("{{{");
            let (inner_start, close) = if triple {
                (at + 3, "}}}")
            } else {
                (at + 2, "}}")
            };
            let Some(len) = self.src[inner_start..].find(close) else {
                return Err(self.error_at(
                    at,
                    format!("a tag opened here is never closed with {close}"),
                ));
            };
            let inner = self.src[inner_start..inner_start + len].trim();
            self.pos = inner_start + len + close.len();
            if triple {
                let expr = self.expr(inner, at)?;
                nodes.push(Node::Value {
                    expr,
                    escape: Escape::None,
                });
                continue;
            }
            let (word, tail) = split_word(inner);
            match word {
                "if" => {
                    let cond = self.expr(tail, at)?;
                    nodes.push(self.if_block(cond, at, depth)?);
                }
                "each" => {
                    let expr = self.expr(tail, at)?;
                    let (body, end) = self.block(depth + 1)?;
                    match end {
                        Some(Closer { word: "end", .. }) => nodes.push(Node::Each { expr, body }),
                        Some(other) => {
                            return Err(self.error_at(
                                other.at,
                                format!("{{{{ {} }}}} inside each", other.word),
                            ));
                        }
                        None => return Err(self.error_at(at, "each without end".into())),
                    }
                }
                "elseif" => {
                    let cond = self.expr(tail, at)?;
                    return Ok((
                        nodes,
                        Some(Closer {
                            word: "elseif",
                            at,
                            cond: Some(cond),
                        }),
                    ));
                }
                "else" | "end" if tail.is_empty() => {
                    let word = if word == "else" { "else" } else { "end" };
                    return Ok((
                        nodes,
                        Some(Closer {
                            word,
                            at,
                            cond: None,
                        }),
                    ));
                }
                _ => {
                    let expr = self.expr(inner, at)?;
                    let escape = match (self.flavor, self.href) {
                        (Flavor::Text, _) => Escape::None,
                        (Flavor::Html, HrefState::Inside(_)) => Escape::Url,
                        (Flavor::Html, HrefState::Outside) => Escape::Html,
                    };
                    nodes.push(Node::Value { expr, escape });
                }
            }
        }
    }

    fn if_block(&mut self, first: Expr, at: usize, depth: usize) -> Result<Node, ParseError> {
        let mut branches = Vec::new();
        let mut cond = first;
        loop {
            let (body, end) = self.block(depth + 1)?;
            branches.push((cond, body));
            match end {
                Some(Closer {
                    word: "elseif",
                    cond: Some(next),
                    ..
                }) => cond = next,
                Some(Closer { word: "else", .. }) => {
                    let (otherwise, end) = self.block(depth + 1)?;
                    return match end {
                        Some(Closer { word: "end", .. }) => Ok(Node::If {
                            branches,
                            otherwise,
                        }),
                        Some(other) => {
                            Err(self
                                .error_at(other.at, format!("{{{{ {} }}}} after else", other.word)))
                        }
                        None => Err(self.error_at(at, "if without end".into())),
                    };
                }
                Some(Closer { word: "end", .. }) => {
                    return Ok(Node::If {
                        branches,
                        otherwise: Vec::new(),
                    });
                }
                Some(other) => {
                    return Err(self.error_at(other.at, format!("unexpected {}", other.word)));
                }
                None => return Err(self.error_at(at, "if without end".into())),
            }
        }
    }

    fn text(&mut self, nodes: &mut Vec<Node>, len: usize) {
        let text = &self.src[self.pos..self.pos + len];
        self.pos += len;
        if text.is_empty() {
            return;
        }
        if self.flavor == Flavor::Html {
            self.href.advance(text);
        }
        if let Some(Node::Text(prev)) = nodes.last_mut() {
            prev.push_str(text);
        } else {
            nodes.push(Node::Text(text.to_string()));
        }
    }

    fn expr(&self, text: &str, at: usize) -> Result<Expr, ParseError> {
        let tokens = tokenize(text).map_err(|m| self.error_at(at, m))?;
        if tokens.is_empty() {
            return Err(self.error_at(at, "empty {{ }}".into()));
        }
        let mut p = ExprParser {
            tokens: &tokens,
            i: 0,
        };
        let expr = p
            .or()
            .map_err(|m| self.error_at(at, format!("{m} in {{{{ {text} }}}}")))?;
        if p.i != tokens.len() {
            return Err(self.error_at(
                at,
                format!("unexpected {:?} in {{{{ {text} }}}}", tokens[p.i]),
            ));
        }
        Ok(expr)
    }
}

fn split_word(inner: &str) -> (&str, &str) {
    match inner.find(|c: char| c.is_whitespace() || c == '(') {
        Some(i) => (&inner[..i], inner[i..].trim()),
        None => (inner, ""),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Path(Vec<Step>),
    Literal(Value),
    And,
    Or,
    Not,
    Cmp(Cmp),
    Open,
    Close,
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let bytes = text.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        match c {
            b'(' => {
                tokens.push(Token::Open);
                i += 1;
            }
            b')' => {
                tokens.push(Token::Close);
                i += 1;
            }
            b'\'' | b'"' => {
                let Some(len) = text[i + 1..].find(c as char) else {
                    return Err("unterminated string".into());
                };
                tokens.push(Token::Literal(Value::String(
                    text[i + 1..i + 1 + len].to_string(),
                )));
                i += len + 2;
            }
            b'=' | b'!' | b'<' | b'>' => {
                let two = bytes.get(i + 1) == Some(&b'=');
                let cmp = match (c, two) {
                    (b'=', true) => Cmp::Eq,
                    (b'!', true) => Cmp::Ne,
                    (b'<', true) => Cmp::Le,
                    (b'>', true) => Cmp::Ge,
                    (b'<', false) => Cmp::Lt,
                    (b'>', false) => Cmp::Gt,
                    _ => return Err(format!("unknown operator {:?}", c as char)),
                };
                tokens.push(Token::Cmp(cmp));
                i += if two { 2 } else { 1 };
            }
            b'0'..=b'9' | b'-' => {
                let start = i;
                i += 1;
                while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                    i += 1;
                }
                let number: f64 = text[start..i]
                    .parse()
                    .map_err(|_| format!("bad number {:?}", &text[start..i]))?;
                let value = serde_json::Number::from_f64(number)
                    .map(Value::Number)
                    .ok_or_else(|| format!("bad number {:?}", &text[start..i]))?;
                tokens.push(Token::Literal(value));
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let (path, len) = path(&text[i..])?;
                i += len;
                tokens.push(match path.as_slice() {
                    [Step::Key(k)] if k == "and" => Token::And,
                    [Step::Key(k)] if k == "or" => Token::Or,
                    [Step::Key(k)] if k == "not" => Token::Not,
                    [Step::Key(k)] if k == "true" => Token::Literal(Value::Bool(true)),
                    [Step::Key(k)] if k == "false" => Token::Literal(Value::Bool(false)),
                    [Step::Key(k)] if k == "null" => Token::Literal(Value::Null),
                    _ => Token::Path(path),
                });
            }
            _ => return Err(format!("unexpected character {:?}", c as char)),
        }
    }
    Ok(tokens)
}

/// A variable path at the start of `text`, and its length.
fn path(text: &str) -> Result<(Vec<Step>, usize), String> {
    let bytes = text.as_bytes();
    let mut steps = Vec::new();
    let mut i = 0;
    let ident = |i: usize| {
        let mut j = i;
        while j < bytes.len()
            && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_' || bytes[j] == b'-')
        {
            j += 1;
        }
        j
    };
    let end = ident(i);
    steps.push(Step::Key(text[i..end].to_string()));
    i = end;
    loop {
        match bytes.get(i) {
            Some(b'.') => {
                let end = ident(i + 1);
                if end == i + 1 {
                    return Err("a name must follow '.'".into());
                }
                steps.push(Step::Key(text[i + 1..end].to_string()));
                i = end;
            }
            Some(b'[') => {
                let Some(len) = text[i + 1..].find(']') else {
                    return Err("unclosed '['".into());
                };
                let index: usize = text[i + 1..i + 1 + len]
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad array index {:?}", &text[i + 1..i + 1 + len]))?;
                if index == 0 {
                    return Err("array indexes start at 1".into());
                }
                steps.push(Step::Index(index - 1));
                i += len + 2;
            }
            _ => return Ok((steps, i)),
        }
    }
}

struct ExprParser<'a> {
    tokens: &'a [Token],
    i: usize,
}

impl ExprParser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.i)
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while self.peek() == Some(&Token::Or) {
            self.i += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.not()?;
        while self.peek() == Some(&Token::And) {
            self.i += 1;
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, String> {
        if self.peek() == Some(&Token::Not) {
            self.i += 1;
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        let left = self.primary()?;
        if let Some(Token::Cmp(cmp)) = self.peek() {
            let cmp = *cmp;
            self.i += 1;
            let right = self.primary()?;
            return Ok(Expr::Compare(cmp, Box::new(left), Box::new(right)));
        }
        Ok(left)
    }

    fn primary(&mut self) -> Result<Expr, String> {
        let token = self.peek().cloned().ok_or("a value is missing")?;
        self.i += 1;
        match token {
            Token::Path(path) => Ok(Expr::Path(path)),
            Token::Literal(value) => Ok(Expr::Literal(value)),
            Token::Open => {
                let inner = self.or()?;
                if self.peek() != Some(&Token::Close) {
                    return Err("unclosed '('".into());
                }
                self.i += 1;
                Ok(inner)
            }
            other => Err(format!("unexpected {other:?}")),
        }
    }
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
        let cases: Cases =
            toml::from_str(include_str!("template_cases.toml")).expect("cases parse");
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
