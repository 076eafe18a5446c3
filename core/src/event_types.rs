//! The event types a sink of the hose (a webhook, a broker) may subscribe to:
//! SparkPost's names, each with the object its events come in, and gannet's own.

/// Every event type a sink may subscribe to: (SparkPost type, its object).
pub const TYPES: &[(&str, &str)] = &[
    ("injection", "message_event"),
    ("delivery", "message_event"),
    ("bounce", "message_event"),
    ("delay", "message_event"),
    ("policy_rejection", "message_event"),
    ("out_of_band", "message_event"),
    ("spam_complaint", "message_event"),
    ("generation_failure", "gen_event"),
    ("open", "track_event"),
    ("click", "track_event"),
    ("list_unsubscribe", "unsubscribe_event"),
    ("link_unsubscribe", "unsubscribe_event"),
    ("adaptive", "gannet_event"),
    ("admin_rebind", "gannet_event"),
    ("cluster", "gannet_event"),
];

/// The types a subscription without a list gets: all of SparkPost's.
pub fn default_types() -> Vec<String> {
    TYPES
        .iter()
        .filter(|t| t.1 != "gannet_event")
        .map(|t| t.0.to_string())
        .collect()
}

/// A set of types, as a bit per entry of [`TYPES`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TypeSet(u32);

impl TypeSet {
    /// The set of `names`; the first unknown name is the error.
    pub fn of<S: AsRef<str>>(names: &[S]) -> Result<TypeSet, String> {
        let mut bits = 0;
        for name in names {
            let name = name.as_ref();
            match TYPES.iter().position(|t| t.0 == name) {
                Some(i) => bits |= 1 << i,
                None => return Err(name.to_string()),
            }
        }
        Ok(TypeSet(bits))
    }

    pub fn contains(&self, name: &str) -> bool {
        TYPES
            .iter()
            .position(|t| t.0 == name)
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }
}
