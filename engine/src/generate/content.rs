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

#[derive(Debug)]
pub enum Content {
    Parts(Box<Parts>),
    /// A whole message given as RFC 822 text; substitutions apply to all of it.
    Rfc822(Template),
}

#[derive(Debug)]
pub struct Parts {
    from_name: Option<Template>,
    from_email: Template,
    subject: Template,
    reply_to: Option<Template>,
    headers: Vec<(String, Template)>,
    text: Option<Template>,
    html: Option<Template>,
    amp_html: Option<Template>,
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
}

/// A generated message: its envelope sender's From address and the bytes.
#[derive(Debug)]
pub struct Generated {
    pub from_email: String,
    /// The subject after substitution (for events).
    pub subject: String,
    pub body: Vec<u8>,
}

fn compile(part: &str, source: &str, flavor: Flavor) -> Result<Template, PartError> {
    Template::parse(source, flavor).map_err(|error| PartError {
        part: part.to_string(),
        error,
    })
}

fn compile_opt(
    part: &str,
    source: Option<&str>,
    flavor: Flavor,
) -> Result<Option<Template>, PartError> {
    source.map(|s| compile(part, s, flavor)).transpose()
}

impl Content {
    pub fn compile_inline(inline: Inline, substitute: bool) -> Result<Content, PartError> {
        // With perform_substitutions off, every part is its literal text.
        let c = |part: &str, text: &str, flavor| {
            if substitute {
                compile(part, text, flavor)
            } else {
                Ok(Template::literal(text))
            }
        };
        let co =
            |part: &str, text: Option<&str>, flavor| text.map(|t| c(part, t, flavor)).transpose();
        Ok(Content::Parts(Box::new(Parts {
            from_name: co("from.name", inline.from_name.as_deref(), Flavor::Text)?,
            from_email: c("from.email", &inline.from_email, Flavor::Text)?,
            subject: c("subject", &inline.subject, Flavor::Text)?,
            reply_to: co("reply_to", inline.reply_to.as_deref(), Flavor::Text)?,
            headers: inline
                .headers
                .iter()
                .map(|(name, value)| {
                    Ok((
                        name.clone(),
                        c(&format!("headers.{name}"), value, Flavor::Text)?,
                    ))
                })
                .collect::<Result<_, PartError>>()?,
            text: co("text", inline.text.as_deref(), Flavor::Text)?,
            html: co("html", inline.html.as_deref(), Flavor::Html)?,
            amp_html: co("amp_html", inline.amp_html.as_deref(), Flavor::Html)?,
            attachments: inline.attachments,
            inline_images: inline.inline_images,
        })))
    }

    pub fn compile_rfc822(source: &str, substitute: bool) -> Result<Content, PartError> {
        let template = if substitute {
            compile_opt("email_rfc822", Some(source), Flavor::Text)?.expect("some")
        } else {
            Template::literal(source)
        };
        Ok(Content::Rfc822(template))
    }

    /// Renders the message for one recipient.
    pub fn generate(
        &self,
        rcpt: Rcpt<'_>,
        scope: Scope<'_>,
        stamp: Stamp<'_>,
    ) -> Result<Generated, RenderError> {
        match self {
            Content::Parts(parts) => parts.generate(rcpt, scope, stamp),
            Content::Rfc822(template) => {
                let text = template.render_to_string(scope)?;
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
}

impl Content {
    /// Every part rendered for `scope`, as the templates API's preview shows it.
    pub fn preview(&self, scope: Scope<'_>) -> Result<serde_json::Value, RenderError> {
        use serde_json::{Map, Value};
        let Content::Parts(p) = self else {
            let Content::Rfc822(template) = self else {
                unreachable!()
            };
            return Ok(serde_json::json!({ "email_rfc822": template.render_to_string(scope)? }));
        };
        let mut out = Map::new();
        let mut from = Map::new();
        from.insert(
            "email".into(),
            header("from.email", &p.from_email, scope)?.into(),
        );
        if let Some(name) = &p.from_name {
            from.insert("name".into(), header("from.name", name, scope)?.into());
        }
        out.insert("from".into(), Value::Object(from));
        out.insert(
            "subject".into(),
            header("subject", &p.subject, scope)?.into(),
        );
        if let Some(reply_to) = &p.reply_to {
            out.insert(
                "reply_to".into(),
                header("reply_to", reply_to, scope)?.into(),
            );
        }
        for (key, part) in [
            ("text", &p.text),
            ("html", &p.html),
            ("amp_html", &p.amp_html),
        ] {
            if let Some(template) = part {
                out.insert(key.into(), template.render_to_string(scope)?.into());
            }
        }
        if !p.headers.is_empty() {
            let mut headers = Map::new();
            for (name, template) in &p.headers {
                headers.insert(name.clone(), header(name, template, scope)?.into());
            }
            out.insert("headers".into(), Value::Object(headers));
        }
        Ok(Value::Object(out))
    }
}

/// Renders a header value, refusing line breaks (header injection).
fn header(part: &str, template: &Template, scope: Scope<'_>) -> Result<String, RenderError> {
    let value = template.render_to_string(scope)?;
    if value.contains(['\r', '\n']) {
        return Err(RenderError(format!(
            "{part} contains a line break after substitution"
        )));
    }
    Ok(value)
}

impl Parts {
    fn generate(
        &self,
        rcpt: Rcpt<'_>,
        scope: Scope<'_>,
        stamp: Stamp<'_>,
    ) -> Result<Generated, RenderError> {
        let from_email = header("from.email", &self.from_email, scope)?;
        if !valid_email(&from_email) {
            return Err(RenderError(format!(
                "from.email {from_email:?} is not an email address"
            )));
        }
        let from_name = self
            .from_name
            .as_ref()
            .map(|t| header("from.name", t, scope))
            .transpose()?;
        let subject = header("subject", &self.subject, scope)?;
        let reply_to = self
            .reply_to
            .as_ref()
            .map(|t| header("reply_to", t, scope))
            .transpose()?;
        let mut custom = Vec::with_capacity(self.headers.len());
        for (name, template) in &self.headers {
            custom.push((name.as_str(), header(name, template, scope)?));
        }
        let text = self
            .text
            .as_ref()
            .map(|t| t.render_to_string(scope))
            .transpose()?;
        let html = self
            .html
            .as_ref()
            .map(|t| t.render_to_string(scope))
            .transpose()?;
        let amp = self
            .amp_html
            .as_ref()
            .map(|t| t.render_to_string(scope))
            .transpose()?;

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
            if self.inline_images.is_empty() {
                alternatives.push(html);
            } else {
                let mut related = vec![html];
                for image in &self.inline_images {
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
        if !self.attachments.is_empty() {
            let mut mixed = vec![body];
            for file in &self.attachments {
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
    !email.starts_with('@') && crate::ingress::smtp::address::parse_path(email, false).is_ok()
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
