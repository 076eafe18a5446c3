//! Parsing a template: the text split at `{{ }}` and `{{{ }}}`, blocks matched with
//! their `end`, expressions tokenized and parsed by precedence, and whether each
//! substitution sits inside an HTML `href` (to percent-encode it there).

use serde_json::Value;

use super::{Cmp, Escape, Expr, Flavor, Node, ParseError, Step};

/// Parses a whole template into its nodes.
pub(super) fn parse(source: &str, flavor: Flavor) -> Result<Vec<Node>, ParseError> {
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
    Ok(nodes)
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
