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
//! conn)`, `smtp_server_data(msg, conn)` and then `smtp_server_message_received(msg,
//! conn)` (both after DATA, before the binding; gannet keeps a message whole, so the
//! two see the same message), `http_message_generated(msg)` (each message an HTTP
//! transmission generates, before it is signed), `get_queue_config(domain, tenant,
//! campaign, routing_domain)` (a scheduled queue's retry schedule and maximum age,
//! asked by delivery once per queue; [`QueueConfig`]), `get_egress_path_config(
//! routing_domain, egress_source, site_name)` (a ready queue's shaping, asked once
//! when it is made), `should_enqueue_log_record(msg, hook_name)` (whether an event
//! goes to a sink of the hose — a webhook, a broker — asked on that sink's thread,
//! off the mail path). `conn:get_meta(key)` answers
//! `received_from` (the client's address), `ehlo_domain`, `tls` (a boolean) and
//! `authn_id` (the AUTH user), nil when unknown; a session keeps one connection
//! object ([`ConnSlot`]). An address is a table with `user`, `domain` and `email`
//! (and prints as the address). A message ([`Message`]) has metadata of any key:
//! `tenant`, `campaign`, `pool` and `routing_domain` are acted on, gannet's own are
//! read-only.
//!
//! Cost: a call builds only what its hook takes — an address table per address, a
//! message object per message hook; the connection object is made once per session.
//! The VM collects generationally, so what a call leaves is collected young.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use mlua::{
    AnyUserData, Function, HookTriggers, IntoLuaMulti, Lua, LuaOptions, LuaSerdeExt, StdLib, Table,
    UserData, UserDataMethods, Value, VmState,
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
    Data = 4,
    MessageReceived = 5,
    HttpMessageGenerated = 6,
    QueueConfig = 7,
    EgressPathConfig = 8,
    LogRecord = 9,
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
    /// Tells this VM from every other loaded in the process (a session's
    /// [`ConnSlot`] holds an object of one VM).
    id: u64,
    lua: Lua,
    hooks: Vec<Option<Function>>,
    /// Slices run by the current call.
    spent: Rc<Cell<u64>>,
    /// Makes envelope addresses ([`address_maker`]).
    address: Function,
    /// Makes the message object of `should_enqueue_log_record` ([`log_record_maker`]).
    log_record: Function,
}

/// The next [`Script::id`].
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A session's connection object in a script's VM, made at the session's first
/// hook and kept current after (made afresh, it would cost every command an
/// allocation and a finalizer for Lua's collector). A script keeping it sees the
/// same connection later, as in KumoMTA.
#[derive(Default)]
pub struct ConnSlot(RefCell<Option<(u64, AnyUserData)>>);

impl std::fmt::Debug for ConnSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.0.borrow().as_ref().map(|(id, _)| *id);
        f.debug_tuple("ConnSlot").field(&held).finish()
    }
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
        // Generational collection: what a hook call leaves (its arguments, the
        // strings it made) dies young, and a minor collection visits only the
        // young — the incremental collector's full cycles over the whole heap had
        // cost a typical hook set more than its own work.
        lua.gc_gen(0, 0);
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
        let address = address_maker(&lua).map_err(|e| e.to_string())?;
        let log_record = log_record_maker(&lua).map_err(|e| e.to_string())?;
        Ok(Script {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            lua,
            hooks,
            spent,
            address,
            log_record,
        })
    }

    /// Whether the script registered `hook`.
    pub fn has(&self, hook: Hook) -> bool {
        self.hooks[hook as usize].is_some()
    }

    /// `smtp_server_connection_accepted(conn)`.
    pub fn connection_accepted(&self, slot: &ConnSlot, client: &Client<'_>) -> Outcome {
        self.call(Hook::ConnectionAccepted, |_| self.conn(slot, client))
    }

    /// `smtp_server_ehlo(domain, conn)`.
    pub fn ehlo(&self, slot: &ConnSlot, client: &Client<'_>) -> Outcome {
        self.call(Hook::Ehlo, |lua| {
            Ok((
                lua.create_string(client.helo.unwrap_or(""))?,
                self.conn(slot, client)?,
            ))
        })
    }

    /// `smtp_server_mail_from(sender, conn)`.
    pub fn mail_from(&self, slot: &ConnSlot, client: &Client<'_>, sender: &str) -> Outcome {
        self.call(Hook::MailFrom, |_| {
            Ok((self.address(sender)?, self.conn(slot, client)?))
        })
    }

    /// `smtp_server_mail_rcpt_to(recipient, conn)`.
    pub fn rcpt_to(&self, slot: &ConnSlot, client: &Client<'_>, recipient: &str) -> Outcome {
        self.call(Hook::RcptTo, |_| {
            Ok((self.address(recipient)?, self.conn(slot, client)?))
        })
    }

    /// `smtp_server_data(msg, conn)` and/or `smtp_server_message_received(msg, conn)`
    /// ([`Hook::Data`], [`Hook::MessageReceived`]), in the order of `hooks`, with one
    /// message object, until one refuses or fails: the message comes back with what
    /// the hooks changed (its metadata, its header fields), whatever the outcome.
    pub fn smtp_message(
        &self,
        hooks: &[Hook],
        slot: &ConnSlot,
        client: &Client<'_>,
        message: Message,
    ) -> (Outcome, Message) {
        self.message_hooks(hooks, message, |lua, msg| {
            (msg, self.conn(slot, client)?).into_lua_multi(lua)
        })
    }

    /// `http_message_generated(msg)`: a message generated for one recipient of an
    /// HTTP transmission, back with what the hook changed.
    pub fn http_message_generated(&self, message: Message) -> (Outcome, Message) {
        self.message_hooks(&[Hook::HttpMessageGenerated], message, |lua, msg| {
            msg.into_lua_multi(lua)
        })
    }

    /// Calls the registered ones of `hooks`, which take a message object (made once,
    /// passed by `args`), until one refuses or fails.
    fn message_hooks(
        &self,
        hooks: &[Hook],
        message: Message,
        args: impl Fn(&Lua, AnyUserData) -> mlua::Result<mlua::MultiValue>,
    ) -> (Outcome, Message) {
        if !hooks.iter().any(|h| self.has(*h)) {
            return (Outcome::Continue, message);
        }
        // Shared with the VM, so that it comes back even if the script keeps a
        // reference to it (the reference is then to an emptied message).
        let shared = Rc::new(RefCell::new(message));
        let view = MessageRef {
            message: shared.clone(),
            address: self.address.clone(),
        };
        let made = self.lua.create_userdata(view);
        let mut outcome = Outcome::Continue;
        for hook in hooks {
            outcome = self.call(*hook, |lua| args(lua, made.clone()?));
            if outcome != Outcome::Continue {
                break;
            }
        }
        let message = std::mem::take(&mut *shared.borrow_mut());
        (outcome, message)
    }

    /// The session's connection object in this VM, brought up to date.
    fn conn(&self, slot: &ConnSlot, client: &Client<'_>) -> mlua::Result<AnyUserData> {
        let mut slot = slot.0.borrow_mut();
        if let Some((id, conn)) = slot.as_ref()
            && *id == self.id
        {
            conn.borrow_mut::<Conn>()?.update(client);
            return Ok(conn.clone());
        }
        let conn = self.lua.create_userdata(Conn::of(client))?;
        *slot = Some((self.id, conn.clone()));
        Ok(conn)
    }

    /// An envelope address (`""` for the null sender) as a table: `email`, `user`,
    /// `domain`. A table, not a userdata: one made per command is then no finalizer
    /// for the collector to run.
    fn address(&self, text: &str) -> mlua::Result<Table> {
        address(&self.address, text)
    }

    /// Tells this VM from any other loaded in the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// `get_queue_config(domain, tenant, campaign, routing_domain)`: the settings the
    /// script gives a scheduled queue (None when it gives none, or registered no
    /// hook); an error names the hook and why.
    pub fn queue_config(
        &self,
        domain: &str,
        tenant: Option<&str>,
        campaign: Option<&str>,
        routing_domain: Option<&str>,
    ) -> Result<Option<QueueConfig>, String> {
        self.config_hook(
            Hook::QueueConfig,
            (domain, tenant, campaign, routing_domain),
            "gannet.make_queue_config",
            |_, table| queue_config(table),
        )
    }

    /// `get_egress_path_config(routing_domain, egress_source, site_name)`: the shaping
    /// the script sets on a ready queue (None when none, or no hook); the keys are
    /// `[delivery.shaping]`'s (`connection_limit`, `max_message_rate = "100/s"`, …).
    pub fn egress_path_config(
        &self,
        routing_domain: &str,
        egress_source: &str,
        site_name: &str,
    ) -> Result<Option<gannet_core::config::shaping::Knobs>, String> {
        self.config_hook(
            Hook::EgressPathConfig,
            (routing_domain, egress_source, site_name),
            "gannet.make_egress_path",
            egress_path,
        )
    }

    /// `should_enqueue_log_record(msg, hook_name)`: whether the event of log line
    /// `line` (one JSON object of the event log) goes to the hose's sink `sink`
    /// (`webhook-<id>`, `amqp-<name>`); true when no hook is registered. `msg` is a
    /// message object whose `get_meta('log_record')` is the event as a table, and
    /// whose `get_meta(key)` is the event's field (`campaign` and `pool` read
    /// `campaign_id` and `ip_pool`). The answer is the hook's return value as Lua
    /// takes a condition (nil: no, as in KumoMTA); an error names the hook and why.
    /// Called on the sink's thread, never on the mail path.
    pub fn should_enqueue_log_record(&self, line: &[u8], sink: &str) -> Result<bool, String> {
        let Some(function) = &self.hooks[Hook::LogRecord as usize] else {
            return Ok(true);
        };
        self.spent.set(0);
        let name = HOOKS[Hook::LogRecord as usize];
        // Parsed into a tree, then made a table: one event at a time, on the sink's
        // thread, only for a script that registered the hook.
        let record: serde_json::Value = serde_json::from_slice(line)
            .map_err(|e| format!("{name}: the event is not JSON ({e})"))?;
        let options = mlua::SerializeOptions::new()
            .serialize_none_to_null(false)
            .serialize_unit_to_null(false);
        let fail = |e: mlua::Error| format!("{name}: {}", first_line(&e));
        let record = self.lua.to_value_with(&record, options).map_err(fail)?;
        let msg: Table = self.log_record.call(record).map_err(fail)?;
        function.call::<bool>((msg, sink)).map_err(fail)
    }

    /// Calls `hook`, which returns a table of settings (made by `maker`) or nil, and
    /// reads the table with `read` (None: nil, or no hook registered); an error names
    /// the hook and why.
    fn config_hook<T>(
        &self,
        hook: Hook,
        args: impl IntoLuaMulti,
        maker: &str,
        read: fn(&Lua, &Table) -> mlua::Result<T>,
    ) -> Result<Option<T>, String> {
        let Some(function) = &self.hooks[hook as usize] else {
            return Ok(None);
        };
        self.spent.set(0);
        let name = HOOKS[hook as usize];
        let fail = |e: &mlua::Error| format!("{name}: {}", first_line(e));
        match function.call::<Value>(args).map_err(|e| fail(&e))? {
            Value::Nil => Ok(None),
            Value::Table(t) => read(&self.lua, &t).map(Some).map_err(|e| fail(&e)),
            other => Err(format!(
                "{name}: returned a {}, not a table ({maker}) or nil",
                other.type_name()
            )),
        }
    }

    /// Calls `hook` with the arguments `args` makes (only when it is registered:
    /// the arguments are built, and allocated, only for a script that asked).
    fn call<A: IntoLuaMulti>(
        &self,
        hook: Hook,
        args: impl FnOnce(&Lua) -> mlua::Result<A>,
    ) -> Outcome {
        let Some(function) = &self.hooks[hook as usize] else {
            return Outcome::Continue;
        };
        self.spent.set(0);
        let result = args(&self.lua).and_then(|args| function.call::<()>(args));
        match result {
            Ok(()) => Outcome::Continue,
            Err(e) => match rejection(&e) {
                Some(reply) => Outcome::Reject(reply),
                None => Outcome::Failed(format!("{}: {}", HOOKS[hook as usize], first_line(&e))),
            },
        }
    }
}

/// A scheduled queue's settings from `get_queue_config`: each it names replaces the
/// configuration's (`[delivery]`, provider and `delivery.queues` rules).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueConfig {
    pub retry_interval_s: Option<u64>,
    pub max_retry_interval_s: Option<u64>,
    pub max_age_s: Option<u64>,
}

/// The keys a queue config takes.
const QUEUE_CONFIG_KEYS: &str = "retry_interval, max_retry_interval, max_age";

/// The longest duration a queue setting takes (as the configuration's: a year).
const QUEUE_SECS_MAX: u64 = 31_536_000;

/// A queue config table checked: durations as seconds or text (`"90s"`, `"10m"`,
/// `"1h30m"`, `"2 days"`), from a second to a year; no other key.
fn queue_config(table: &Table) -> mlua::Result<QueueConfig> {
    let mut config = QueueConfig::default();
    for pair in table.pairs::<String, Value>() {
        let (key, value) = pair?;
        let slot = match key.as_str() {
            "retry_interval" => &mut config.retry_interval_s,
            "max_retry_interval" => &mut config.max_retry_interval_s,
            "max_age" => &mut config.max_age_s,
            other => {
                return Err(mlua::Error::runtime(format!(
                    "queue config: no setting {other:?} in gannet (settings: {QUEUE_CONFIG_KEYS})"
                )));
            }
        };
        let secs = match &value {
            Value::Integer(n) => u64::try_from(*n).ok(),
            Value::Number(n) if n.is_finite() && *n >= 1.0 => Some(*n as u64),
            Value::String(text) => text.to_str().ok().and_then(|t| {
                gannet_core::config::automation::parse_duration(&t).or_else(|| {
                    humantime::parse_duration(t.trim())
                        .ok()
                        .map(|d| d.as_secs())
                })
            }),
            _ => None,
        };
        match secs.filter(|s| (1..=QUEUE_SECS_MAX).contains(s)) {
            Some(s) => *slot = Some(s),
            None => {
                return Err(mlua::Error::runtime(format!(
                    "queue config: {key} is a duration from 1 second to a year (seconds, or text such as \"10m\" or \"2 days\"), not {value:?}"
                )));
            }
        }
    }
    Ok(config)
}

/// An egress path's shaping from a table with `[delivery.shaping]`'s keys, checked
/// as the configuration's are (an unknown key or a bad value names itself): the
/// table is read by the configuration's own deserializer.
fn egress_path(lua: &Lua, table: &Table) -> mlua::Result<gannet_core::config::shaping::Knobs> {
    lua.from_value(Value::Table(table.clone()))
        .map_err(|e| mlua::Error::runtime(format!("egress path: {}", first_line(&e))))
}

/// The function that makes an address table from its three strings, sharing one
/// metatable with `__tostring` (the address). Made in Lua: the table is built by
/// the VM in one call, where building it field by field from Rust takes a call
/// across for each.
fn address_maker(lua: &Lua) -> mlua::Result<Function> {
    lua.load(
        "local meta = { __tostring = function(a) return a.email end }\n\
         return function(email, user, domain)\n\
           return setmetatable({ email = email, user = user, domain = domain }, meta)\n\
         end",
    )
    .set_name("=address")
    .eval()
}

/// The function that makes `should_enqueue_log_record`'s message object from an
/// event's table: `get_meta('log_record')` is the table, `get_meta(key)` its field
/// (`campaign`, `pool`: `campaign_id`, `ip_pool`); `set_meta('queue', …)` is taken
/// and changes nothing (the sink that asks is where the event goes: KumoMTA's
/// policies name a queue there), any other key is an error.
fn log_record_maker(lua: &Lua) -> mlua::Result<Function> {
    lua.load(
        "local alias = { campaign = 'campaign_id', pool = 'ip_pool' }\n\
         local methods = {}\n\
         function methods:get_meta(key)\n\
           if key == 'log_record' then return self.log_record end\n\
           return self.log_record[alias[key] or key]\n\
         end\n\
         function methods:set_meta(key, value)\n\
           if key ~= 'queue' then\n\
             error(\"set_meta: a log record's metadata is read-only (only 'queue' is taken, and the sink asking is where the event goes)\", 2)\n\
           end\n\
         end\n\
         local meta = { __index = methods }\n\
         return function(record)\n\
           return setmetatable({ log_record = record }, meta)\n\
         end",
    )
    .set_name("=log_record")
    .eval()
}

/// `text` as an address table made by `maker` ([`address_maker`]).
fn address(maker: &Function, text: &str) -> mlua::Result<Table> {
    let user = text.rsplit_once('@').map_or(text, |(u, _)| u);
    maker.call((text, user, super::domain_of(text)))
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
    // Checks a queue's settings and gives them back (what `get_queue_config`
    // returns), as KumoMTA's does.
    gannet.set(
        "make_queue_config",
        lua.create_function(|_, table: Table| {
            queue_config(&table)?;
            Ok(table)
        })?,
    )?;
    // Checks an egress path's shaping and gives it back (what
    // `get_egress_path_config` returns), as KumoMTA's does.
    gannet.set(
        "make_egress_path",
        lua.create_function(|lua, table: Table| {
            egress_path(lua, &table)?;
            Ok(table)
        })?,
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
    peer: std::net::IpAddr,
    helo: Option<String>,
    tls: bool,
    auth: Option<String>,
}

impl Conn {
    fn of(client: &Client<'_>) -> Conn {
        Conn {
            peer: client.ip,
            helo: client.helo.map(str::to_string),
            tls: client.tls,
            auth: client.auth_user.map(str::to_string),
        }
    }

    /// Takes what changed since (EHLO, STARTTLS, AUTH): nothing is allocated when
    /// nothing did.
    fn update(&mut self, client: &Client<'_>) {
        fn set(to: &mut Option<String>, from: Option<&str>) {
            if to.as_deref() != from {
                *to = from.map(str::to_string);
            }
        }
        set(&mut self.helo, client.helo);
        set(&mut self.auth, client.auth_user);
        self.tls = client.tls;
    }
}

impl UserData for Conn {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("get_meta", |lua, this, key: mlua::String| {
            let text = |t: Option<&str>| match t {
                Some(t) => lua.create_string(t).map(Value::String),
                None => Ok(Value::Nil),
            };
            match &*key.as_bytes() {
                b"received_from" => text(Some(&this.peer.to_string())),
                b"ehlo_domain" => text(this.helo.as_deref()),
                b"tls" => Ok(Value::Boolean(this.tls)),
                b"authn_id" => text(this.auth.as_deref()),
                _ => Ok(Value::Nil),
            }
        });
    }
}

/// A message as the message hooks see it: the envelope, its metadata and the
/// message as it will be spooled.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Message {
    pub sender: String,
    pub recipients: Vec<String>,
    /// Its metadata by key: `tenant`, `campaign`, `pool` and `routing_domain`
    /// ([`POLICY_META`], which gannet acts on), the keys gannet records
    /// ([`READ_ONLY_META`]) and a script's own (kept in the spool record).
    pub meta: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The metadata keys gannet acts on, which a script may set.
pub const POLICY_META: &[&str] = &["tenant", "campaign", "pool", "routing_domain"];

/// The metadata keys gannet records itself: a script reads them and cannot set them.
pub const READ_ONLY_META: &[&str] = &[
    "peer",
    "auth_user",
    "transmission_id",
    "template_id",
    "rcpt_meta",
    "rcpt_tags",
    "kind",
    gannet_core::queue::settle::META_EXPIRES,
    gannet_core::dsn::META_RET,
    gannet_core::dsn::META_ENVID,
    gannet_core::dsn::META_RCPTS,
    gannet_core::dsn::META_REPORT_FOR,
];

/// The longest metadata key and value a script may set (a value: a header line's
/// length, RFC 5322 2.1.1).
const META_KEY_MAX: usize = 64;
const META_VALUE_MAX: usize = 998;

impl Message {
    /// The value of `key`, if set.
    pub fn meta(&self, key: &str) -> Option<&str> {
        gannet_core::queue::meta_value(&self.meta, key)
    }

    /// Removes `key` and gives its value.
    pub fn take_meta(&mut self, key: &str) -> Option<String> {
        let at = self.meta.iter().position(|(k, _)| k == key)?;
        Some(self.meta.remove(at).1)
    }

    /// Sets (or with None removes) `key`, checked: gannet's own keys are read-only;
    /// a tenant, campaign or pool is a token, a routing domain a domain name; any
    /// other key is up to 64 characters without spaces, its value one line.
    pub fn set_meta(&mut self, key: &str, value: Option<String>) -> Result<(), String> {
        if READ_ONLY_META.contains(&key) {
            return Err(format!("{key:?} is set by gannet and cannot be changed"));
        }
        if key == "queue" {
            // KumoMTA's whole queue name: gannet names each recipient domain's part
            // of a message itself.
            return Err(
                "\"queue\" is gannet's to name (campaign:tenant@domain): set tenant, campaign or routing_domain"
                    .into(),
            );
        }
        let token = |v: &str| !v.chars().any(|c| c.is_control() || c.is_whitespace());
        if key.is_empty() || key.len() > META_KEY_MAX || !token(key) {
            return Err(format!(
                "{key:?} is not a metadata key (1 to {META_KEY_MAX} characters without spaces)"
            ));
        }
        let value = match value {
            None => {
                self.take_meta(key);
                return Ok(());
            }
            Some(v) if key == "routing_domain" => {
                // A name to look up (route, MX): no address literal, no U-label.
                let v = v.to_ascii_lowercase();
                if !gannet_core::address::is_dns_name(&v) {
                    return Err(format!(
                        "routing_domain {v:?} is not a domain name (ASCII labels; an IDN in its xn-- form)"
                    ));
                }
                v
            }
            Some(v) if POLICY_META.contains(&key) => {
                if v.is_empty() || v.len() > 255 || !token(&v) {
                    return Err(format!(
                        "{key}: a value is 1 to 255 characters without spaces or control characters"
                    ));
                }
                v
            }
            Some(v) => {
                if v.len() > META_VALUE_MAX || v.chars().any(char::is_control) {
                    return Err(format!(
                        "{key}: a value is one line of at most {META_VALUE_MAX} bytes"
                    ));
                }
                v
            }
        };
        match self.meta.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.meta.push((key.to_string(), value)),
        }
        Ok(())
    }

    /// KumoMTA's `import_x_headers`: every `X-` header field (or those `names`
    /// lists, any case) into the metadata, its key the name in lower case with `-`
    /// as `_`; a later field of a name wins. A value is unfolded, its control
    /// characters made spaces, and cut to [`META_VALUE_MAX`] bytes.
    pub fn import_x_headers(&mut self, names: Option<&[String]>) -> Result<(), String> {
        for (name, value) in gannet_core::headers::all(&self.body) {
            let wanted = match names {
                None => name.get(..2).is_some_and(|x| x.eq_ignore_ascii_case("x-")),
                Some(names) => names.iter().any(|n| n.eq_ignore_ascii_case(&name)),
            };
            if !wanted {
                continue;
            }
            let key = name.to_ascii_lowercase().replace('-', "_");
            let mut value: String = value
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            if value.len() > META_VALUE_MAX {
                let mut cut = META_VALUE_MAX;
                while !value.is_char_boundary(cut) {
                    cut -= 1;
                }
                value.truncate(cut);
            }
            self.set_meta(&key, Some(value))?;
        }
        Ok(())
    }
}

struct MessageRef {
    message: Rc<RefCell<Message>>,
    /// The VM's address maker (for `msg:sender()` and the recipients).
    address: Function,
}

impl UserData for MessageRef {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("sender", |_, this, ()| {
            address(&this.address, &this.message.borrow().sender)
        });
        methods.add_method("recipient", |_, this, ()| {
            let m = this.message.borrow();
            address(
                &this.address,
                m.recipients.first().map_or("", |r| r.as_str()),
            )
        });
        methods.add_method("recipients", |lua, this, ()| {
            let m = this.message.borrow();
            let list = lua.create_table_with_capacity(m.recipients.len(), 0)?;
            for r in &m.recipients {
                list.raw_push(address(&this.address, r)?)?;
            }
            Ok(list)
        });
        // Names are read where Lua keeps them (`mlua::String`): no copy per call.
        methods.add_method("get_meta", |_, this, key: mlua::String| {
            Ok(this
                .message
                .borrow()
                .meta(&key.to_str()?)
                .map(str::to_string))
        });
        methods.add_method(
            "set_meta",
            |_, this, (key, value): (mlua::String, Option<String>)| {
                let key = key.to_str()?;
                (this.message.borrow_mut().set_meta(&key, value))
                    .map_err(|e| mlua::Error::runtime(format!("msg:set_meta: {e}")))
            },
        );
        methods.add_method("import_x_headers", |_, this, names: Option<Vec<String>>| {
            (this.message.borrow_mut().import_x_headers(names.as_deref()))
                .map_err(|e| mlua::Error::runtime(format!("msg:import_x_headers: {e}")))
        });
        methods.add_method(
            "get_first_named_header_value",
            |_, this, name: mlua::String| {
                Ok(gannet_core::headers::first_value(
                    &this.message.borrow().body,
                    &name.to_str()?,
                ))
            },
        );
        methods.add_method(
            "append_header",
            |_, this, (name, value): (String, String)| {
                gannet_core::headers::append(&mut this.message.borrow_mut().body, &name, &value)
                    .map_err(|e| mlua::Error::runtime(format!("msg:append_header: {e}")))
            },
        );
        methods.add_method("remove_all_named_headers", |_, this, name: mlua::String| {
            Ok(gannet_core::headers::remove_all(
                &mut this.message.borrow_mut().body,
                &name.to_str()?,
            ))
        });
        methods.add_method("set_force_sync", |_, _, _: mlua::MultiValue| Ok(()));
    }
}

#[cfg(test)]
mod tests;
