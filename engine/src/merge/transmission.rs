//! A SparkPost transmission as the API receives it, and its checked, compiled form.
//!
//! Unknown fields are ignored (SparkPost's convention). [`Spec`] is also what a
//! multi-recipient job stores in the spool: the request with its stored template and
//! recipient list resolved, so that generation can resume after a restart.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::content::{Binary, Content, Dialect, Inline, PartError, valid_email};

/// The request body of `POST /api/v1/transmissions`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Spec {
    #[serde(default)]
    pub options: Options,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, deserialize_with = "object_or_null")]
    pub metadata: Map<String, Value>,
    #[serde(default, deserialize_with = "object_or_null")]
    pub substitution_data: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients: Option<Recipients>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<ContentSpec>,
}

fn object_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
    Ok(Option::<Map<String, Value>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Options {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_tracking: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub click_tracking: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transactional: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_suppression: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline_css: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perform_substitutions: Option<bool>,
    /// gannet's: when the messages expire if not yet delivered — seconds after the
    /// transmission is accepted (a number or a string of digits) or an RFC 3339
    /// time; the delivery's max_age still applies when it comes first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Value>,
}

impl Options {
    /// The messages' expiry (unix ms) for a transmission accepted at
    /// `accepted_ms`: None without `expires`, Err when it has another form.
    pub fn expires_ms(&self, accepted_ms: u64) -> Result<Option<u64>, String> {
        let Some(value) = &self.expires else {
            return Ok(None);
        };
        let text = match value {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            _ => String::new(),
        };
        gannet_core::queue::settle::parse_expiry(&text, accepted_ms)
            .map(Some)
            .ok_or_else(|| {
                format!("options.expires: {value} is not seconds or an RFC 3339 time within a year")
            })
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Recipients {
    Inline(Vec<RecipientSpec>),
    Stored { list_id: String },
}

#[derive(Deserialize)]
struct StoredList {
    list_id: String,
}

/// Deserializes `$ty` from a string (`$text`) or from a map (`$map`, a struct
/// deserialized in place so that errors inside it keep their path), and, for
/// [`Recipients`], from a sequence. serde's untagged enums would only say "did not
/// match any variant".
macro_rules! string_or_map {
    ($ty:ident, $expecting:literal, text: $text:expr, map: $map:ty => $from_map:expr, seq: $seq:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$ty, E> {
                        let text: Option<fn(String) -> $ty> = $text;
                        match text {
                            Some(make) => Ok(make(v.to_string())),
                            None => Err(E::invalid_type(serde::de::Unexpected::Str(v), &self)),
                        }
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        map: A,
                    ) -> Result<$ty, A::Error> {
                        let inner =
                            <$map>::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                        let make: fn($map) -> $ty = $from_map;
                        Ok(make(inner))
                    }
                    fn visit_seq<A: serde::de::SeqAccess<'de>>(
                        self,
                        seq: A,
                    ) -> Result<$ty, A::Error> {
                        let make: Option<fn(Vec<RecipientSpec>) -> $ty> = $seq;
                        match make {
                            Some(make) => Ok(make(Vec::deserialize(
                                serde::de::value::SeqAccessDeserializer::new(seq),
                            )?)),
                            None => Err(serde::de::Error::invalid_type(
                                serde::de::Unexpected::Seq,
                                &self,
                            )),
                        }
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

string_or_map!(Recipients, "an array of recipients or {\"list_id\": …}",
    text: None, map: StoredList => |s| Recipients::Stored { list_id: s.list_id }, seq: Some(Recipients::Inline));
string_or_map!(AddressSpec, "an email address or {\"email\": …}",
    text: Some(AddressSpec::Text), map: FullAddress => |a| AddressSpec::Full { email: a.email, name: a.name, header_to: a.header_to }, seq: None);
string_or_map!(FromSpec, "an email address or {\"email\": …, \"name\": …}",
    text: Some(FromSpec::Text), map: FullFrom => |a| FromSpec::Full { email: a.email, name: a.name }, seq: None);

#[derive(Deserialize)]
struct FullAddress {
    email: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    header_to: Option<String>,
}

#[derive(Deserialize)]
struct FullFrom {
    email: String,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecipientSpec {
    pub address: AddressSpec,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "tags_or_null"
    )]
    pub tags: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Map::is_empty",
        deserialize_with = "object_or_null"
    )]
    pub metadata: Map<String, Value>,
    #[serde(
        default,
        skip_serializing_if = "Map::is_empty",
        deserialize_with = "object_or_null"
    )]
    pub substitution_data: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_path: Option<String>,
}

fn tags_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum AddressSpec {
    /// `a@b` or `Name <a@b>`.
    Text(String),
    Full {
        email: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        header_to: Option<String>,
    },
}

impl AddressSpec {
    /// (email, name, header_to)
    pub fn parts(&self) -> (&str, Option<&str>, Option<&str>) {
        match self {
            AddressSpec::Text(text) => {
                let (name, email) = split_name_addr(text);
                (email, name, None)
            }
            AddressSpec::Full {
                email,
                name,
                header_to,
            } => (email.trim(), name.as_deref(), header_to.as_deref()),
        }
    }
}

/// `Name <a@b>` → (Some("Name"), "a@b"); `a@b` → (None, "a@b").
pub fn split_name_addr(text: &str) -> (Option<&str>, &str) {
    let text = text.trim();
    match (text.rfind('<'), text.ends_with('>')) {
        (Some(open), true) => {
            let name = text[..open].trim().trim_matches('"').trim();
            (
                (!name.is_empty()).then_some(name),
                text[open + 1..text.len() - 1].trim(),
            )
        }
        _ => (None, text),
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum FromSpec {
    Text(String),
    Full {
        email: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContentSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<FromSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amp_html: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Map<String, Value>>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "files_or_null"
    )]
    pub attachments: Vec<FileSpec>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "files_or_null"
    )]
    pub inline_images: Vec<FileSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_draft_template: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_rfc822: Option<String>,
    /// The template language of the parts (gannet's own field: KumoMTA's inject
    /// API sends Jinja); SparkPost's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dialect: Option<Dialect>,
}

fn files_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<FileSpec>, D::Error> {
    Ok(Option::<Vec<FileSpec>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub content_type: String,
    /// Base64.
    pub data: String,
}

/// A request that cannot be accepted: HTTP status, SparkPost code, message and
/// description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: &'static str,
    pub description: String,
}

impl Refusal {
    pub fn missing(description: impl Into<String>) -> Refusal {
        Refusal {
            status: 422,
            code: "1400",
            message: "required field is missing",
            description: description.into(),
        }
    }

    pub fn invalid(description: impl Into<String>) -> Refusal {
        Refusal {
            status: 422,
            code: "1300",
            message: "invalid data format/type",
            description: description.into(),
        }
    }

    pub fn combination(description: impl Into<String>) -> Refusal {
        Refusal {
            status: 422,
            code: "1301",
            message: "Invalid combination of fields",
            description: description.into(),
        }
    }
}

/// The longest a header value from the API may be before substitution.
const HEADER_VALUE_BYTES_MAX: usize = 998;

impl ContentSpec {
    /// Checks inline content and compiles it.
    pub fn compile(&self, substitute: bool) -> Result<Content, Refusal> {
        if let Some(rfc822) = &self.email_rfc822 {
            if self.from.is_some()
                || self.subject.is_some()
                || self.text.is_some()
                || self.html.is_some()
            {
                return Err(Refusal::combination(
                    "email_rfc822 cannot be combined with inline content fields",
                ));
            }
            return Content::compile_rfc822(rfc822, substitute, self.dialect.unwrap_or_default())
                .map_err(template_refusal);
        }
        let Some(from) = &self.from else {
            return Err(Refusal::missing("content.from is required"));
        };
        let (from_name, from_email) = match from {
            FromSpec::Text(text) => {
                let (name, email) = split_name_addr(text);
                (name.map(str::to_string), email.to_string())
            }
            FromSpec::Full { email, name } => (name.clone(), email.trim().to_string()),
        };
        if from_email.is_empty() {
            return Err(Refusal::missing("content.from.email is required"));
        }
        if !from_email.contains("{{") && !valid_email(&from_email) {
            return Err(Refusal::invalid(format!(
                "content.from: {from_email:?} is not an email address"
            )));
        }
        let Some(subject) = &self.subject else {
            return Err(Refusal::missing("content.subject is required"));
        };
        if self.text.is_none() && self.html.is_none() && self.amp_html.is_none() {
            return Err(Refusal::missing(
                "content needs at least one of text, html or amp_html",
            ));
        }
        let mut headers = Vec::new();
        for (name, value) in self.headers.iter().flatten() {
            let Value::String(value) = value else {
                return Err(Refusal::invalid(format!(
                    "content.headers.{name}: header values must be strings"
                )));
            };
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                return Err(Refusal::invalid(format!(
                    "content.headers: {name:?} is not a header name"
                )));
            }
            if value.contains(['\r', '\n']) || value.len() > HEADER_VALUE_BYTES_MAX {
                return Err(Refusal::invalid(format!(
                    "content.headers.{name}: a value must be one line of at most {HEADER_VALUE_BYTES_MAX} bytes"
                )));
            }
            headers.push((name.clone(), value.clone()));
        }
        let inline = Inline {
            from_name,
            from_email,
            subject: subject.clone(),
            reply_to: self.reply_to.clone(),
            headers,
            text: self.text.clone(),
            html: self.html.clone(),
            amp_html: self.amp_html.clone(),
            attachments: decode_files("attachments", &self.attachments)?,
            inline_images: decode_files("inline_images", &self.inline_images)?,
        };
        Content::compile_inline(inline, substitute, self.dialect.unwrap_or_default())
            .map_err(template_refusal)
    }
}

fn decode_files(field: &str, files: &[FileSpec]) -> Result<Vec<Binary>, Refusal> {
    use base64::Engine as _;
    files
        .iter()
        .enumerate()
        .map(|(i, file)| {
            if file.name.is_empty() || file.name.contains(['\r', '\n', '"']) {
                return Err(Refusal::invalid(format!(
                    "content.{field}[{i}].name is not a file name"
                )));
            }
            if !file.content_type.contains('/') || file.content_type.contains(['\r', '\n']) {
                return Err(Refusal::invalid(format!(
                    "content.{field}[{i}].type is not a MIME type"
                )));
            }
            let data: String = file.data.split_ascii_whitespace().collect();
            let data = base64::engine::general_purpose::STANDARD
                .decode(data)
                .map_err(|e| {
                    Refusal::invalid(format!("content.{field}[{i}].data is not base64: {e}"))
                })?;
            Ok(Binary {
                name: file.name.clone(),
                content_type: file.content_type.clone(),
                data,
            })
        })
        .collect()
}

fn template_refusal(err: PartError) -> Refusal {
    Refusal {
        status: 422,
        code: "3000",
        message: "substitution language syntax error in template content",
        description: format!(
            "Error while compiling part {}: line {}: {}",
            err.part, err.error.line, err.error.message
        ),
    }
}
