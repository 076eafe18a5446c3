//! `[inbound]`: mail gannet reads rather than relays — out-of-band bounces and
//! spam complaints (feedback loop reports) sent to its own domains.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboundConfig {
    /// Recipient domains whose mail is feedback: accepted from any client (no relay
    /// permission needed), never relayed; a DSN becomes out_of_band events, an ARF
    /// report a spam_complaint event. Point the MX of your return-path and
    /// feedback-loop domains here.
    pub domains: Vec<String>,
    /// Leave out the `X-Gannet-Id` header (the signed token that names a message in
    /// the reports about it) from the mail gannet sends.
    pub no_feedback_header: bool,
}
