//! A transmission's content compiled once (every template parsed, attachments
//! decoded) and turned into one RFC 5322 message per recipient with mail-builder:
//! multipart/alternative for text + AMP + HTML, multipart/related for inline images,
//! multipart/mixed for attachments, RFC 2047 for non-ASCII headers,
//! quoted-printable or base64 bodies as the content needs.

use mail_builder::MessageBuilder;
use mail_builder::headers::HeaderType;
use mail_builder::headers::address::Address;
use mail_builder::headers::date::Date;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::text::Text;
use mail_builder::mime::MimePart;

use super::template::{Flavor, ParseError, RenderError, Scope, Template};
use super::tracking::Track;

/// A template that failed to compile, with the part it is in (`subject`, `html`, …).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{part}: {error}")]
pub struct PartError {
    pub part: String,
    pub error: ParseError,
}

/// A decoded attachment or inline image.
#[derive(Debug, Clone)]
pub struct Binary {
    pub name: String,
    pub content_type: String,
    pub data: Vec<u8>,
}

/// The parts of inline content, uncompiled (as the API gave them).
#[derive(Debug, Clone, Default)]
pub struct Inline {
    pub from_name: Option<String>,
    pub from_email: String,
    pub subject: String,
    pub reply_to: Option<String>,
    pub headers: Vec<(String, String)>,
    pub text: Option<String>,
    pub html: Option<String>,
    pub amp_html: Option<String>,
    pub attachments: Vec<Binary>,
    pub inline_images: Vec<Binary>,
}

/// The template language of a transmission's parts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// SparkPost's (`merge::template`).
    #[default]
    SparkPost,
    /// Jinja via minijinja (KumoMTA's inject API); HTML parts are auto-escaped.
    Jinja,
}

/// One compiled part.
#[derive(Debug)]
enum Part {
    SparkPost(Template),
    /// The name of a template in the content's Jinja environment.
    Jinja(String),
}

/// Compiled content: its parts and, for Jinja, the environment that holds them.
#[derive(Debug)]
pub struct Content {
    body: Body,
    jinja: minijinja::Environment<'static>,
    /// Move the rules of `<style>` elements into `style` attributes of the HTML after
    /// substitution (SparkPost's `inline_css`), for clients that ignore style sheets.
    pub inline_css: bool,
}

#[derive(Debug)]
enum Body {
    Parts(Box<Parts>),
    /// A whole message given as RFC 822 text; substitutions apply to all of it.
    Rfc822(Part),
}

#[derive(Debug)]
struct Parts {
    from_name: Option<Part>,
    from_email: Part,
    subject: Part,
    reply_to: Option<Part>,
    headers: Vec<(String, Part)>,
    text: Option<Part>,
    html: Option<Part>,
    amp_html: Option<Part>,
    attachments: Vec<Binary>,
    inline_images: Vec<Binary>,
}

/// Who one generated message is for.
#[derive(Debug, Clone, Copy)]
pub struct Rcpt<'a> {
    pub email: &'a str,
    pub name: Option<&'a str>,
    /// Overrides the To header (SparkPost's way to show a CC or BCC list).
    pub header_to: Option<&'a str>,
}

/// What is stamped on every generated message.
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    /// The Message-ID, without angle brackets.
    pub message_id: &'a str,
    pub unix_secs: u64,
    /// The one-click unsubscribe URL (RFC 8058) to add, unless the content sets a
    /// List-Unsubscribe of its own.
    pub list_unsubscribe: Option<&'a str>,
    /// The feedback header's token (`X-Gannet-Id`), naming the message in the
    /// bounces and complaints that quote it.
    pub feedback: Option<&'a str>,
}

/// A generated message: its envelope sender's From address and the bytes.
#[derive(Debug)]
pub struct Generated {
    pub from_email: String,
    /// The subject after substitution (for events).
    pub subject: String,
    pub body: Vec<u8>,
}

/// Compiles the parts of one content in one dialect.
struct Compiler {
    dialect: Dialect,
    substitute: bool,
    jinja: minijinja::Environment<'static>,
}

impl Compiler {
    fn new(dialect: Dialect, substitute: bool) -> Compiler {
        Compiler {
            dialect,
            substitute,
            jinja: minijinja::Environment::new(),
        }
    }

    fn part(&mut self, name: &str, source: &str, flavor: Flavor) -> Result<Part, PartError> {
        // With perform_substitutions off, every part is its literal text.
        if !self.substitute {
            return Ok(Part::SparkPost(Template::literal(source)));
        }
        let failed = |line: usize, message: String| PartError {
            part: name.to_string(),
            error: ParseError { line, message },
        };
        match self.dialect {
            Dialect::SparkPost => Template::parse(source, flavor)
                .map(Part::SparkPost)
                .map_err(|e| failed(e.line, e.message)),
            Dialect::Jinja => {
                // The extension turns minijinja's HTML auto-escaping on.
                let key = match flavor {
                    Flavor::Html => format!("{name}.html"),
                    Flavor::Text => name.to_string(),
                };
                self.jinja
                    .add_template_owned(key.clone(), source.to_string())
                    .map_err(|e| {
                        failed(
                            e.line().unwrap_or(1),
                            e.detail().unwrap_or(&e.to_string()).to_string(),
                        )
                    })?;
                Ok(Part::Jinja(key))
            }
        }
    }

    fn opt(
        &mut self,
        name: &str,
        source: Option<&str>,
        flavor: Flavor,
    ) -> Result<Option<Part>, PartError> {
        source.map(|s| self.part(name, s, flavor)).transpose()
    }
}

impl Content {
    pub fn compile_inline(
        inline: Inline,
        substitute: bool,
        dialect: Dialect,
    ) -> Result<Content, PartError> {
        let mut c = Compiler::new(dialect, substitute);
        let mut headers = Vec::with_capacity(inline.headers.len());
        for (name, value) in &inline.headers {
            headers.push((
                name.clone(),
                c.part(&format!("headers.{name}"), value, Flavor::Text)?,
            ));
        }
        let parts = Parts {
            from_name: c.opt("from.name", inline.from_name.as_deref(), Flavor::Text)?,
            from_email: c.part("from.email", &inline.from_email, Flavor::Text)?,
            subject: c.part("subject", &inline.subject, Flavor::Text)?,
            reply_to: c.opt("reply_to", inline.reply_to.as_deref(), Flavor::Text)?,
            headers,
            text: c.opt("text", inline.text.as_deref(), Flavor::Text)?,
            html: c.opt("html", inline.html.as_deref(), Flavor::Html)?,
            amp_html: c.opt("amp_html", inline.amp_html.as_deref(), Flavor::Html)?,
            attachments: inline.attachments,
            inline_images: inline.inline_images,
        };
        Ok(Content {
            body: Body::Parts(Box::new(parts)),
            jinja: c.jinja,
            inline_css: false,
        })
    }

    pub fn compile_rfc822(
        source: &str,
        substitute: bool,
        dialect: Dialect,
    ) -> Result<Content, PartError> {
        let mut c = Compiler::new(dialect, substitute);
        let part = c.part("email_rfc822", source, Flavor::Text)?;
        Ok(Content {
            body: Body::Rfc822(part),
            jinja: c.jinja,
            inline_css: false,
        })
    }

    fn render(&self, part: &Part, scope: Scope<'_>) -> Result<String, RenderError> {
        match part {
            Part::SparkPost(template) => template.render_to_string(scope),
            Part::Jinja(key) => {
                let template = self
                    .jinja
                    .get_template(key)
                    .map_err(|e| RenderError(e.to_string()))?;
                template
                    .render(minijinja::value::Value::from(minijinja::value::Serde(
                        scope,
                    )))
                    .map_err(|e| RenderError(format!("{}: {}", key.trim_end_matches(".html"), e)))
            }
        }
    }

    /// Renders a header value, refusing line breaks (header injection).
    fn header(&self, name: &str, part: &Part, scope: Scope<'_>) -> Result<String, RenderError> {
        let value = self.render(part, scope)?;
        if value.contains(['\r', '\n']) {
            return Err(RenderError(format!(
                "{name} contains a line break after substitution"
            )));
        }
        Ok(value)
    }

    fn render_opt(
        &self,
        part: &Option<Part>,
        scope: Scope<'_>,
    ) -> Result<Option<String>, RenderError> {
        part.as_ref().map(|p| self.render(p, scope)).transpose()
    }

    /// Renders the message for one recipient (with its HTML tracked when `track`).
    pub fn generate(
        &self,
        rcpt: Rcpt<'_>,
        scope: Scope<'_>,
        stamp: Stamp<'_>,
        track: Option<Track<'_>>,
    ) -> Result<Generated, RenderError> {
        match &self.body {
            Body::Parts(parts) => self.generate_parts(parts, rcpt, scope, stamp, track),
            Body::Rfc822(part) => {
                let text = self.render(part, scope)?;
                let body = crlf(text.as_bytes());
                let from_email = header_address(&body, "from").unwrap_or_default();
                let subject = header_value(&body, "subject").unwrap_or_default();
                Ok(Generated {
                    from_email,
                    subject,
                    body,
                })
            }
        }
    }

    /// Every part rendered for `scope`, as the templates API's preview shows it.
    pub fn preview(&self, scope: Scope<'_>) -> Result<serde_json::Value, RenderError> {
        use serde_json::{Map, Value};
        let p = match &self.body {
            Body::Parts(p) => p,
            Body::Rfc822(part) => {
                return Ok(serde_json::json!({ "email_rfc822": self.render(part, scope)? }));
            }
        };
        let mut out = Map::new();
        let mut from = Map::new();
        from.insert(
            "email".into(),
            self.header("from.email", &p.from_email, scope)?.into(),
        );
        if let Some(name) = &p.from_name {
            from.insert("name".into(), self.header("from.name", name, scope)?.into());
        }
        out.insert("from".into(), Value::Object(from));
        out.insert(
            "subject".into(),
            self.header("subject", &p.subject, scope)?.into(),
        );
        if let Some(reply_to) = &p.reply_to {
            out.insert(
                "reply_to".into(),
                self.header("reply_to", reply_to, scope)?.into(),
            );
        }
        for (key, part) in [
            ("text", &p.text),
            ("html", &p.html),
            ("amp_html", &p.amp_html),
        ] {
            if let Some(rendered) = self.render_opt(part, scope)? {
                out.insert(key.into(), rendered.into());
            }
        }
        if !p.headers.is_empty() {
            let mut headers = Map::new();
            for (name, part) in &p.headers {
                headers.insert(name.clone(), self.header(name, part, scope)?.into());
            }
            out.insert("headers".into(), Value::Object(headers));
        }
        Ok(Value::Object(out))
    }

    fn generate_parts(
        &self,
        parts: &Parts,
        rcpt: Rcpt<'_>,
        scope: Scope<'_>,
        stamp: Stamp<'_>,
        track: Option<Track<'_>>,
    ) -> Result<Generated, RenderError> {
        let from_email = self.header("from.email", &parts.from_email, scope)?;
        if !valid_email(&from_email) {
            return Err(RenderError(format!(
                "from.email {from_email:?} is not an email address"
            )));
        }
        let from_name = parts
            .from_name
            .as_ref()
            .map(|p| self.header("from.name", p, scope))
            .transpose()?;
        let subject = self.header("subject", &parts.subject, scope)?;
        let reply_to = parts
            .reply_to
            .as_ref()
            .map(|p| self.header("reply_to", p, scope))
            .transpose()?;
        let mut custom = Vec::with_capacity(parts.headers.len());
        for (name, part) in &parts.headers {
            custom.push((name.as_str(), self.header(name, part, scope)?));
        }
        let text = self.render_opt(&parts.text, scope)?;
        let mut html = self.render_opt(&parts.html, scope)?;
        if let (true, Some(rendered)) = (self.inline_css, &html) {
            let inliner = css_inline::CSSInliner::options()
                .load_remote_stylesheets(false)
                .build();
            html = Some(
                inliner
                    .inline(rendered)
                    .map_err(|e| RenderError(format!("inline_css: {e}")))?,
            );
        }
        if let (Some(track), Some(rendered)) = (track, &html) {
            html = Some(track.apply(rendered));
        }
        let amp = self.render_opt(&parts.amp_html, scope)?;

        let mut builder = MessageBuilder::new()
            .from(Address::new_address(
                from_name.as_deref().filter(|n| !n.is_empty()),
                from_email.as_str(),
            ))
            .subject(Text::new(subject.clone()))
            .message_id(MessageId::new(stamp.message_id))
            .date(Date::new(stamp.unix_secs as i64));
        builder = match rcpt.header_to {
            Some(to) => builder.header("To", HeaderType::Raw(Raw::new(to))),
            None => builder.to(Address::new_address(rcpt.name, rcpt.email)),
        };
        if let Some(reply_to) = &reply_to {
            builder = builder.header("Reply-To", HeaderType::Raw(Raw::new(reply_to.as_str())));
        }
        if let Some(token) = stamp.feedback {
            builder = builder.header("X-Gannet-Id", HeaderType::Raw(Raw::new(token)));
        }
        if let Some(url) = stamp.list_unsubscribe
            && !custom
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("list-unsubscribe"))
        {
            builder = builder
                .header(
                    "List-Unsubscribe",
                    HeaderType::Raw(Raw::new(format!("<{url}>"))),
                )
                .header(
                    "List-Unsubscribe-Post",
                    HeaderType::Raw(Raw::new("List-Unsubscribe=One-Click")),
                );
        }
        for (name, value) in &custom {
            let value = if value.is_ascii() {
                HeaderType::Raw(Raw::new(value.as_str()))
            } else {
                HeaderType::Text(Text::new(value.as_str()))
            };
            builder = builder.header(*name, value);
        }

        let mut alternatives = Vec::with_capacity(3);
        if let Some(text) = text {
            alternatives.push(MimePart::new("text/plain; charset=utf-8", text));
        }
        if let Some(amp) = amp {
            alternatives.push(MimePart::new("text/x-amp-html; charset=utf-8", amp));
        }
        if let Some(html) = html {
            let html = MimePart::new("text/html; charset=utf-8", html);
            if parts.inline_images.is_empty() {
                alternatives.push(html);
            } else {
                let mut related = vec![html];
                for image in &parts.inline_images {
                    related.push(
                        MimePart::new(image.content_type.as_str(), image.data.as_slice())
                            .inline()
                            .cid(image.name.as_str()),
                    );
                }
                alternatives.push(MimePart::new("multipart/related", related));
            }
        }
        let mut body = if alternatives.len() == 1 {
            alternatives.pop().expect("one part")
        } else {
            MimePart::new("multipart/alternative", alternatives)
        };
        if !parts.attachments.is_empty() {
            let mut mixed = vec![body];
            for file in &parts.attachments {
                mixed.push(
                    MimePart::new(file.content_type.as_str(), file.data.as_slice())
                        .attachment(file.name.as_str()),
                );
            }
            body = MimePart::new("multipart/mixed", mixed);
        }
        let mut out = Vec::with_capacity(1024);
        builder.body(body).serialize(&mut out);
        Ok(Generated {
            from_email,
            subject,
            body: out,
        })
    }
}

/// Whether `email` is a `local@domain` address by the rules of an SMTP path.
pub fn valid_email(email: &str) -> bool {
    // A source route is SMTP syntax, not an address.
    !email.starts_with('@') && gannet_core::address::parse_path(email, false).is_ok()
}

/// The (unfolded) value of a header of an RFC 822 message.
fn header_value(message: &[u8], name: &str) -> Option<String> {
    let head_end = memchr::memmem::find(message, b"\r\n\r\n").unwrap_or(message.len());
    let head = std::str::from_utf8(&message[..head_end]).ok()?;
    let mut lines = head.split("\r\n").peekable();
    while let Some(line) = lines.next() {
        let is_it = line.len() > name.len()
            && line.as_bytes()[name.len()] == b':'
            && line[..name.len()].eq_ignore_ascii_case(name);
        if is_it {
            let mut value = line[name.len() + 1..].trim().to_string();
            while let Some(next) = lines.next_if(|l| l.starts_with([' ', '\t'])) {
                value.push(' ');
                value.push_str(next.trim());
            }
            return Some(value);
        }
    }
    None
}

/// The address in a header of an RFC 822 message (`Name <a@b>` or `a@b`).
fn header_address(message: &[u8], name: &str) -> Option<String> {
    let value = header_value(message, name)?;
    let value = value.as_str();
    let email = match (value.rfind('<'), value.rfind('>')) {
        (Some(open), Some(close)) if open < close => &value[open + 1..close],
        _ => value,
    };
    Some(email.trim().to_string())
}

/// Normalises line endings to CRLF (bare LF and bare CR become CRLF).
pub fn crlf(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 32);
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if text.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    out
}
