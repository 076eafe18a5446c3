//! The declarative policy of the configuration: rules per phase, first match wins,
//! and the egress pool chosen by the pool header, then the tenant, then the default.

use std::collections::BTreeMap;

use super::{Client, Draft, Policy, Verdict, domain_of};
use gannet_core::config::{Action, Phase, PolicyConfig, Rule};
use gannet_core::reply::Reply;

#[derive(Debug)]
pub struct RulesPolicy {
    rules: Vec<Rule>,
    tenant_pools: BTreeMap<String, String>,
    default_pool: String,
}

impl RulesPolicy {
    pub fn new(config: &PolicyConfig) -> RulesPolicy {
        let mut rules = config.rules.clone();
        for rule in &mut rules {
            for d in rule
                .sender_domains
                .iter_mut()
                .chain(rule.recipient_domains.iter_mut())
            {
                *d = d.to_ascii_lowercase();
            }
        }
        RulesPolicy {
            rules,
            tenant_pools: config.tenant_pools.clone(),
            default_pool: config.default_pool.clone(),
        }
    }

    fn decide(
        &self,
        phase: Phase,
        client: &Client<'_>,
        sender: Option<&str>,
        recipients: &[&str],
        size: Option<u64>,
    ) -> Verdict {
        for rule in self.rules.iter().filter(|r| r.phase == phase) {
            if !rule.client_networks.is_empty()
                && !rule.client_networks.iter().any(|n| n.contains(client.ip))
            {
                continue;
            }
            if !rule.sender_domains.is_empty()
                && !sender.is_some_and(|s| domain_matches(&rule.sender_domains, domain_of(s)))
            {
                continue;
            }
            if !rule.recipient_domains.is_empty()
                && !recipients
                    .iter()
                    .any(|r| domain_matches(&rule.recipient_domains, domain_of(r)))
            {
                continue;
            }
            if let Some(over) = rule.size_bytes_over
                && size.is_none_or(|s| s <= over)
            {
                continue;
            }
            return match (rule.action, &rule.reply) {
                (Action::Accept, _) => Verdict::Accept,
                (_, Some(reply)) => Verdict::Reject(Reply::configured(reply.code, &reply.text)),
                (Action::Reject, None) => {
                    Verdict::Reject(Reply::fixed(550, "5.7.1", "rejected by policy"))
                }
                (Action::Tempfail, None) => Verdict::Reject(Reply::fixed(
                    451,
                    "4.7.1",
                    "deferred by policy, try again later",
                )),
            };
        }
        Verdict::Continue
    }
}

/// `domains` are lower-case; an entry matches the domain itself and, if it starts with
/// a dot, any subdomain (`.example.com`).
fn domain_matches(domains: &[String], domain: &str) -> bool {
    let domain = domain.to_ascii_lowercase();
    domains.iter().any(|d| match d.strip_prefix('.') {
        Some(suffix) => domain.ends_with(d.as_str()) || domain == suffix,
        None => domain == *d,
    })
}

impl Policy for RulesPolicy {
    fn connect(&self, client: &Client<'_>) -> Verdict {
        self.decide(Phase::Connect, client, None, &[], None)
    }

    fn ehlo(&self, client: &Client<'_>) -> Verdict {
        self.decide(Phase::Ehlo, client, None, &[], None)
    }

    fn mail_from(&self, client: &Client<'_>, sender: &str) -> Verdict {
        self.decide(Phase::MailFrom, client, Some(sender), &[], None)
    }

    fn rcpt_to(&self, client: &Client<'_>, sender: &str, recipient: &str) -> Verdict {
        self.decide(Phase::RcptTo, client, Some(sender), &[recipient], None)
    }

    fn data(&self, client: &Client<'_>, draft: &Draft<'_>) -> Verdict {
        // Small allocation per message, only when data rules exist.
        if !self.rules.iter().any(|r| r.phase == Phase::Data) {
            return Verdict::Continue;
        }
        let recipients: Vec<&str> = draft.recipients.iter().map(String::as_str).collect();
        self.decide(
            Phase::Data,
            client,
            Some(draft.sender),
            &recipients,
            Some(draft.size_bytes),
        )
    }

    fn set_binding(&self, _client: &Client<'_>, draft: &Draft<'_>) -> String {
        if let Some(pool) = draft.requested_pool {
            return pool.to_string();
        }
        if let Some(pool) = draft.tenant.and_then(|t| self.tenant_pools.get(t)) {
            return pool.clone();
        }
        self.default_pool.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gannet_core::config::Config;

    fn policy(rules: &str) -> RulesPolicy {
        let config = Config::parse(
            &format!("[delivery]\npools = {{ warm = [{{ source = \"default\" }}] }}\n[policy]\ntenant_pools = {{ acme = \"warm\" }}\nrules = [{rules}]\n"),
            "t",
        )
        .unwrap();
        RulesPolicy::new(&config.policy)
    }

    fn client(ip: &str) -> Client<'static> {
        Client {
            ip: ip.parse().unwrap(),
            helo: None,
            tls: false,
            auth_user: None,
        }
    }

    #[test]
    fn first_matching_rule_decides() {
        let p = policy(
            "{ phase = \"connect\", client_networks = [\"192.0.2.0/24\"], action = \"reject\", reply = \"554 5.7.1 go away\" },\
             { phase = \"mail_from\", sender_domains = [\".spam.test\"], action = \"tempfail\" },\
             { phase = \"rcpt_to\", recipient_domains = [\"bounces.test\"], action = \"accept\" },\
             { phase = \"rcpt_to\", client_networks = [\"10.0.0.0/8\"], recipient_domains = [\"b.test\"], action = \"reject\" },\
             { phase = \"data\", size_bytes_over = 100, action = \"reject\" }",
        );
        assert_eq!(
            p.connect(&client("192.0.2.9")),
            Verdict::Reject(Reply::configured(554, "5.7.1 go away"))
        );
        assert_eq!(p.connect(&client("127.0.0.1")), Verdict::Continue);
        let c = client("10.1.1.1");
        assert!(matches!(p.mail_from(&c, "x@a.spam.test"), Verdict::Reject(r) if r.code == 451));
        assert!(matches!(p.mail_from(&c, "x@spam.test"), Verdict::Reject(r) if r.code == 451));
        assert_eq!(p.mail_from(&c, "x@notspam.test"), Verdict::Continue);
        assert_eq!(p.rcpt_to(&c, "", "x@BOUNCES.test"), Verdict::Accept);
        assert!(matches!(p.rcpt_to(&c, "", "x@b.test"), Verdict::Reject(r) if r.code == 550));
        assert_eq!(
            p.rcpt_to(&client("127.0.0.1"), "", "x@b.test"),
            Verdict::Continue
        );
        let recipients = ["a@c.test".to_string()];
        let mut draft = Draft {
            sender: "s@a.test",
            recipients: &recipients,
            size_bytes: 101,
            tenant: Some("acme"),
            campaign: None,
            requested_pool: None,
        };
        assert!(matches!(p.data(&c, &draft), Verdict::Reject(r) if r.code == 550));
        assert_eq!(p.set_binding(&c, &draft), "warm");
        draft.size_bytes = 100;
        draft.tenant = Some("other");
        assert_eq!(p.data(&c, &draft), Verdict::Continue);
        assert_eq!(p.set_binding(&c, &draft), "default");
        draft.requested_pool = Some("hot");
        assert_eq!(p.set_binding(&c, &draft), "hot");
    }
}
