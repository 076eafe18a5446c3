//! Scripted policy: a Lua 5.4 script (`[policy] script`), loaded into one VM per
//! shard — no lock, no call crossing cores — that registers hooks by KumoMTA's event
//! names with `gannet.on(name, function)` (the table is also reachable as `kumo`, so
//! that `kumo.on(…)` and `kumo.reject(…)` in a ported policy need no change).
//!
//! The VM has the safe standard libraries only (base without `dofile`, `loadfile` and
//! `load`; `string`, `table`, `math`, `utf8`): no `io`, `os`, `package` or `debug`,
//! so a hook cannot block the executor on a file or a socket, nor load code at run
//! time. Every call runs under an instruction budget (`script_instruction_budget`),
//! counted by a VM hook every [`SLICE`] instructions: a hook that loops is stopped
//! with an error naming the budget. A hook refuses with `gannet.reject(code, text)`
//! (a 4xx or 5xx code; an enhanced status code may start the text); any other error
//! is a failure, which the caller turns into 451 4.3.0 and an event — never a 250,
//! never a panic.
//!
//! Hooks today: `smtp_server_connection_accepted(conn)`, `smtp_server_ehlo(domain,
//! conn)`, `smtp_server_mail_from(sender, conn)`, `smtp_server_mail_rcpt_to(recipient,
//! conn)`, `smtp_server_message_received(msg, conn)` (see [`Message`]). `conn:get_meta(key)` answers `received_from` (the client's address),
//! `ehlo_domain`, `tls` (a boolean) and `authn_id` (the AUTH user), nil when unknown;
//! an address has the fields `user`, `domain` and `email` (and prints as the
//! address). The other names of [`HOOKS`] may be registered already; gannet calls
//! them as their phases are wired.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use mlua::{
    Function, HookTriggers, Lua, LuaOptions, MetaMethod, StdLib, UserData, UserDataFields,
    UserDataMethods, Value, VmState,
};

use gannet_core::reply::{Reply, is_enhanced_code};

use super::Client;

/// Instructions between two checks of the budget: the VM hook's cost is paid once
/// per slice, so a budget is enforced to within a slice.
pub const SLICE: u32 = 1000;

/// The hooks a script may register, by KumoMTA's event names.
pub const HOOKS: &[&str] = &[
    "smtp_server_connection_accepted",
    "smtp_server_ehlo",
    "smtp_server_mail_from",
    "smtp_server_mail_rcpt_to",
    "smtp_server_data",
    "smtp_server_message_received",
    "http_message_generated",
    "get_queue_config",
    "get_egress_path_config",
    "should_enqueue_log_record",
];

/// A hook gannet calls (an index into [`HOOKS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    ConnectionAccepted = 0,
    Ehlo = 1,
    MailFrom = 2,
    RcptTo = 3,
    MessageReceived = 5,
}

/// What a hook call came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No hook registered, or it returned.
    Continue,
    /// `gannet.reject(code, text)`.
    Reject(Reply),
    /// A run-time error or the budget exceeded: the first line of the error.
    Failed(String),
}

/// The reply a client gets when a hook fails.
pub fn failure_reply() -> Reply {
    Reply::fixed(451, "4.3.0", "policy script failed; try again later")
}

/// A script's text as configured, checked to load: what shards compile their VMs
/// from (a VM cannot leave its thread; the text can).
#[derive(Debug, PartialEq, Eq)]
pub struct ScriptSource {
    pub name: String,
    pub text: String,
    pub budget: u64,
}

impl ScriptSource {
    /// The script `[policy] script` names, read and loaded once in a VM thrown away
    /// (None when it names none); an error names the key, the file and the line.
    pub fn from_config(
        policy: &gannet_core::config::PolicyConfig,
    ) -> Result<Option<ScriptSource>, String> {
        if policy.script.is_empty() {
            return Ok(None);
        }
        let path = std::path::Path::new(&policy.script);
        let source = ScriptSource {
            name: path.display().to_string(),
            text: std::fs::read_to_string(path)
                .map_err(|e| format!("policy.script: cannot read {}: {e}", path.display()))?,
            budget: policy.script_instruction_budget.get(),
        };
        source
            .compile()
            .map_err(|e| format!("policy.script: {e}"))?;
        Ok(Some(source))
    }

    /// A VM running this script.
    pub fn compile(&self) -> Result<Script, String> {
        Script::load(&self.name, &self.text, self.budget)
    }
}

/// A loaded script: its VM and its hooks.
pub struct Script {
    lua: Lua,
    hooks: Vec<Option<Function>>,
    /// Slices run by the current call.
    spent: Rc<Cell<u64>>,
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let registered: Vec<&str> = (HOOKS.iter().zip(&self.hooks))
            .filter_map(|(name, f)| f.as_ref().map(|_| *name))
            .collect();
        f.debug_struct("Script")
            .field("hooks", &registered)
            .finish()
    }
}

/// `gannet.reject`'s refusal, carried through Lua as an error.
#[derive(Debug)]
struct Rejection(Reply);

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rejected with {}", self.0.code)
    }
}

impl std::error::Error for Rejection {}

impl Script {
    /// Runs `source` (named `name` in errors, which give its line) in a new VM.
    pub fn load(name: &str, source: &str, budget: u64) -> Result<Script, String> {
        let lua = Lua::new_with(
            StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8,
            LuaOptions::new(),
        )
        .map_err(|e| e.to_string())?;
        let registered: Rc<RefCell<Vec<Option<Function>>>> =
            Rc::new(RefCell::new(vec![None; HOOKS.len()]));
        let spent = Rc::new(Cell::new(0u64));
        setup(&lua, registered.clone()).map_err(|e| first_line(&e))?;
        let slices = (budget / u64::from(SLICE)).max(1);
        let counter = spent.clone();
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(SLICE),
            move |_, _| {
                let n = counter.get() + 1;
                counter.set(n);
                if n > slices {
                    return Err(mlua::Error::runtime(format!(
                        "instruction budget of {budget} exceeded (script_instruction_budget)"
                    )));
                }
                Ok(VmState::Continue)
            },
        )
        .map_err(|e| e.to_string())?;
        spent.set(0);
        lua.load(source)
            .set_name(format!("@{name}"))
            .exec()
            .map_err(|e| first_line(&e))?;
        let hooks = registered.borrow().clone();
        Ok(Script { lua, hooks, spent })
    }

    /// Whether the script registered `hook`.
    pub fn has(&self, hook: Hook) -> bool {
        self.hooks[hook as usize].is_some()
    }

    /// `smtp_server_connection_accepted(conn)`.
    pub fn connection_accepted(&self, client: &Client<'_>) -> Outcome {
        self.call(Hook::ConnectionAccepted, |lua| {
            Ok(vec![Value::UserData(
                lua.create_userdata(Conn::of(client))?,
            )])
        })
    }

    /// `smtp_server_ehlo(domain, conn)`.
    pub fn ehlo(&self, client: &Client<'_>) -> Outcome {
        self.call(Hook::Ehlo, |lua| {
            Ok(vec![
                Value::String(lua.create_string(client.helo.unwrap_or(""))?),
                Value::UserData(lua.create_userdata(Conn::of(client))?),
            ])
        })
    }

    /// `smtp_server_mail_from(sender, conn)`.
    pub fn mail_from(&self, client: &Client<'_>, sender: &str) -> Outcome {
        self.call(Hook::MailFrom, |lua| {
            Ok(vec![
                Value::UserData(lua.create_userdata(Address(sender.to_string()))?),
                Value::UserData(lua.create_userdata(Conn::of(client))?),
            ])
        })
    }

    /// `smtp_server_mail_rcpt_to(recipient, conn)`.
    pub fn rcpt_to(&self, client: &Client<'_>, recipient: &str) -> Outcome {
        self.call(Hook::RcptTo, |lua| {
            Ok(vec![
                Value::UserData(lua.create_userdata(Address(recipient.to_string()))?),
                Value::UserData(lua.create_userdata(Conn::of(client))?),
            ])
        })
    }

    /// `smtp_server_message_received(msg, conn)`: the message comes back with what the
    /// hook changed (its metadata, its header fields), whatever the outcome.
    pub fn message_received(&self, client: &Client<'_>, message: Message) -> (Outcome, Message) {
        if !self.has(Hook::MessageReceived) {
            return (Outcome::Continue, message);
        }
        // Shared with the VM, so that it comes back even if the script keeps a
        // reference to it (the reference is then to an emptied message).
        let shared = Rc::new(RefCell::new(message));
        let view = MessageRef(shared.clone());
        let outcome = self.call(Hook::MessageReceived, |lua| {
            Ok(vec![
                Value::UserData(lua.create_userdata(view)?),
                Value::UserData(lua.create_userdata(Conn::of(client))?),
            ])
        });
        let message = std::mem::take(&mut *shared.borrow_mut());
        (outcome, message)
    }

    /// Calls `hook` with the arguments `args` makes (only when it is registered:
    /// the arguments are built, and allocated, only for a script that asked).
    fn call(&self, hook: Hook, args: impl FnOnce(&Lua) -> mlua::Result<Vec<Value>>) -> Outcome {
        let Some(function) = &self.hooks[hook as usize] else {
            return Outcome::Continue;
        };
        self.spent.set(0);
        let result =
            args(&self.lua).and_then(|args| function.call::<()>(mlua::MultiValue::from_iter(args)));
        match result {
            Ok(()) => Outcome::Continue,
            Err(e) => match rejection(&e) {
                Some(reply) => Outcome::Reject(reply),
                None => Outcome::Failed(format!("{}: {}", HOOKS[hook as usize], first_line(&e))),
            },
        }
    }
}

/// The `gannet` table (also `kumo`), and the base library's loaders removed.
fn setup(lua: &Lua, registered: Rc<RefCell<Vec<Option<Function>>>>) -> mlua::Result<()> {
    let globals = lua.globals();
    for name in ["dofile", "loadfile", "load"] {
        globals.set(name, Value::Nil)?;
    }
    let gannet = lua.create_table()?;
    gannet.set(
        "on",
        lua.create_function(move |_, (name, function): (String, Function)| {
            let Some(i) = HOOKS.iter().position(|h| *h == name) else {
                return Err(mlua::Error::runtime(format!(
                    "gannet.on: no hook named {name:?} (hooks: {})",
                    HOOKS.join(", ")
                )));
            };
            let mut hooks = registered.borrow_mut();
            if hooks[i].is_some() {
                return Err(mlua::Error::runtime(format!(
                    "gannet.on: {name} is registered already (one function per hook)"
                )));
            }
            hooks[i] = Some(function);
            Ok(())
        })?,
    )?;
    gannet.set(
        "reject",
        lua.create_function(
            |_, (code, text): (i64, Option<String>)| -> mlua::Result<()> {
                Err(mlua::Error::external(Rejection(reject_reply(
                    code,
                    text.as_deref().unwrap_or(""),
                )?)))
            },
        )?,
    )?;
    gannet.set(
        "set_force_sync",
        lua.create_function(|_, _: mlua::MultiValue| Ok(()))?,
    )?;
    globals.set("gannet", gannet.clone())?;
    globals.set("kumo", gannet)?;
    Ok(())
}

/// The reply of `gannet.reject(code, text)`: a 4xx or 5xx code, and the text, which
/// may start with an enhanced status code of the same class (else one is chosen:
/// 4.7.1 or 5.7.1, "delivery not authorized").
fn reject_reply(code: i64, text: &str) -> mlua::Result<Reply> {
    let Some(code) = u16::try_from(code).ok().filter(|c| (400..600).contains(c)) else {
        return Err(mlua::Error::runtime(format!(
            "gannet.reject: code {code} is not a 4xx or 5xx reply code"
        )));
    };
    let class = char::from(b'0' + (code / 100) as u8);
    let (enhanced, rest) = match text.split_once(' ') {
        Some((head, rest)) if is_enhanced_code(head) && head.starts_with(class) => {
            (head.to_string(), rest)
        }
        _ if is_enhanced_code(text) && text.starts_with(class) => (text.to_string(), ""),
        _ => (format!("{class}.7.1"), text),
    };
    // One line of printable text: a script's CR or LF must not end the reply early.
    let rest: String = rest
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let rest = if rest.trim().is_empty() {
        "rejected by policy".to_string()
    } else {
        rest
    };
    Ok(Reply::configured(code, &format!("{enhanced} {rest}")))
}

/// The reply of a `gannet.reject` somewhere in `e`'s causes.
fn rejection(e: &mlua::Error) -> Option<Reply> {
    match e {
        mlua::Error::CallbackError { cause, .. } => rejection(cause),
        mlua::Error::WithContext { cause, .. } => rejection(cause),
        mlua::Error::ExternalError(inner) => inner.downcast_ref::<Rejection>().map(|r| r.0.clone()),
        _ => None,
    }
}

/// An error's first line (its traceback left out), without mlua's prefixes.
fn first_line(e: &mlua::Error) -> String {
    let text = match e {
        mlua::Error::CallbackError { cause, .. } => return first_line(cause),
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        mlua::Error::RuntimeError(message) => message.clone(),
        other => other.to_string(),
    };
    text.lines().next().unwrap_or("").to_string()
}

/// The connection as a hook sees it.
struct Conn {
    peer: String,
    helo: Option<String>,
    tls: bool,
    auth: Option<String>,
}

impl Conn {
    fn of(client: &Client<'_>) -> Conn {
        Conn {
            peer: client.ip.to_string(),
            helo: client.helo.map(str::to_string),
            tls: client.tls,
            auth: client.auth_user.map(str::to_string),
        }
    }
}

impl UserData for Conn {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("get_meta", |lua, this, key: String| {
            Ok(match key.as_str() {
                "received_from" => Value::String(lua.create_string(&this.peer)?),
                "ehlo_domain" => match &this.helo {
                    Some(h) => Value::String(lua.create_string(h)?),
                    None => Value::Nil,
                },
                "tls" => Value::Boolean(this.tls),
                "authn_id" => match &this.auth {
                    Some(a) => Value::String(lua.create_string(a)?),
                    None => Value::Nil,
                },
                _ => Value::Nil,
            })
        });
    }
}

/// An envelope address (`""` for the null sender).
struct Address(String);

impl UserData for Address {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("email", |_, this| Ok(this.0.clone()));
        fields.add_field_method_get("user", |_, this| {
            Ok(this
                .0
                .rsplit_once('@')
                .map_or(this.0.as_str(), |(u, _)| u)
                .to_string())
        });
        fields.add_field_method_get(
            "domain",
            |_, this| Ok(super::domain_of(&this.0).to_string()),
        );
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| Ok(this.0.clone()));
    }
}

/// A received message as `smtp_server_message_received` sees it: the envelope, the
/// metadata a script may set, and the message as it will be spooled.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Message {
    pub sender: String,
    pub recipients: Vec<String>,
    pub tenant: Option<String>,
    pub campaign: Option<String>,
    pub pool: Option<String>,
    pub body: Vec<u8>,
}

/// The metadata keys `msg:get_meta` and `msg:set_meta` know.
const META_KEYS: &str = "tenant, campaign, pool";

impl Message {
    fn meta(&mut self, key: &str) -> mlua::Result<&mut Option<String>> {
        match key {
            "tenant" => Ok(&mut self.tenant),
            "campaign" => Ok(&mut self.campaign),
            "pool" => Ok(&mut self.pool),
            _ => Err(mlua::Error::runtime(format!(
                "msg:get_meta/set_meta: no key {key:?} (keys: {META_KEYS})"
            ))),
        }
    }
}

struct MessageRef(Rc<RefCell<Message>>);

impl UserData for MessageRef {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("sender", |_, this, ()| {
            Ok(Address(this.0.borrow().sender.clone()))
        });
        methods.add_method("recipient", |_, this, ()| {
            Ok(Address(
                this.0
                    .borrow()
                    .recipients
                    .first()
                    .cloned()
                    .unwrap_or_default(),
            ))
        });
        methods.add_method("recipients", |_, this, ()| {
            let m = this.0.borrow();
            Ok(m.recipients
                .iter()
                .cloned()
                .map(Address)
                .collect::<Vec<_>>())
        });
        methods.add_method("get_meta", |_, this, key: String| {
            Ok(this.0.borrow_mut().meta(&key)?.clone())
        });
        methods.add_method("set_meta", |_, this, (key, value): (String, Option<String>)| {
            if let Some(v) = &value
                && (v.is_empty()
                    || v.len() > 255
                    || v.chars().any(|c| c.is_control() || c.is_whitespace()))
            {
                return Err(mlua::Error::runtime(format!(
                    "msg:set_meta({key:?}): a value is 1 to 255 characters without spaces or control characters"
                )));
            }
            *this.0.borrow_mut().meta(&key)? = value;
            Ok(())
        });
        methods.add_method("get_first_named_header_value", |_, this, name: String| {
            Ok(gannet_core::headers::first_value(
                &this.0.borrow().body,
                &name,
            ))
        });
        methods.add_method(
            "append_header",
            |_, this, (name, value): (String, String)| {
                gannet_core::headers::append(&mut this.0.borrow_mut().body, &name, &value)
                    .map_err(|e| mlua::Error::runtime(format!("msg:append_header: {e}")))
            },
        );
        methods.add_method("remove_all_named_headers", |_, this, name: String| {
            Ok(gannet_core::headers::remove_all(
                &mut this.0.borrow_mut().body,
                &name,
            ))
        });
        methods.add_method("set_force_sync", |_, _, _: mlua::MultiValue| Ok(()));
    }
}

#[cfg(test)]
mod tests;
