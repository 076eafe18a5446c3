use std::cell::RefCell;
use std::rc::Rc;

use super::*;

/// A token source answering from a script of answers, recording what was asked
/// and given back.
#[derive(Debug, Default)]
struct Store {
    asks: RefCell<Vec<u32>>,
    given_back: RefCell<u32>,
    /// The answer the next ask gets when it is taken; None: not answered yet.
    next: RefCell<Option<Answer>>,
    nodes: u64,
}

struct Reply(Rc<Store>);

impl Asked for Reply {
    fn answer(&mut self) -> Option<Answer> {
        self.0.next.borrow_mut().take()
    }
}

#[derive(Debug)]
struct Source(Rc<Store>);

impl TokenSource for Source {
    fn ask(&self, _key: &str, _rate: Rate, wanted: u32) -> Box<dyn Asked> {
        self.0.asks.borrow_mut().push(wanted);
        Box::new(Reply(self.0.clone()))
    }
    fn give_back(&self, _key: &str, _rate: Rate, tokens: u32) {
        *self.0.given_back.borrow_mut() += tokens;
    }
    fn claim(&self, _key: &str, _limit: u32, wanted: u32, _open: u32) -> Box<dyn Asked> {
        self.0.asks.borrow_mut().push(wanted);
        Box::new(Reply(self.0.clone()))
    }
    fn nodes(&self) -> u64 {
        self.0.nodes.max(1)
    }
    fn window_ms(&self) -> u64 {
        250
    }
}

fn leased(rate: Rate, nodes: u64) -> (Rc<Store>, Leased) {
    let store = Rc::new(Store {
        nodes,
        ..Store::default()
    });
    let l = Leased::new(Rc::new(Source(store.clone())), "q".into(), rate);
    (store, l)
}

const HUNDRED_PER_S: Rate = Rate::Per {
    count: 100,
    per_ms: 1000,
};

fn grant(store: &Store, tokens: u32, wait_ms: u64) {
    *store.next.borrow_mut() = Some(Answer::Granted { tokens, wait_ms });
}

#[test]
fn nothing_passes_before_the_first_lease_is_answered() {
    let (store, mut l) = leased(HUNDRED_PER_S, 1);
    assert_eq!(l.acquire(0), Err(POLL));
    assert_eq!(*store.asks.borrow(), [1], "a first lease of one token");
    // Asked once while the answer is under way.
    assert_eq!(l.acquire(1000), Err(POLL));
    assert_eq!(store.asks.borrow().len(), 1);
    grant(&store, 1, 0);
    assert_eq!(l.acquire(2000), Ok(()));
}

#[test]
fn leases_grow_with_the_rate_spent_up_to_a_window_of_the_limit() {
    let (store, mut l) = leased(HUNDRED_PER_S, 1);
    let _ = l.acquire(0);
    grant(&store, 1, 0);
    assert_eq!(l.acquire(1000), Ok(()));
    // One token spent in 1 ms: the recent rate would be 250 a window; the limit
    // allows 25 in 250 ms.
    assert_eq!(*store.asks.borrow(), [1, 25]);
    grant(&store, 25, 0);
    for i in 0..25 {
        assert_eq!(l.acquire(2000 + i), Ok(()), "token {i}");
    }
    assert_eq!(l.tokens(), 0);
    // The next lease went out ahead, when a quarter (6) was left.
    assert_eq!(store.asks.borrow().len(), 3);
}

#[test]
fn a_partial_grant_waits_for_the_next_token_and_a_window_before_asking_again() {
    let (store, mut l) = leased(HUNDRED_PER_S, 1);
    let _ = l.acquire(0);
    grant(&store, 0, 40);
    // Answered: nothing conforms for 40 ms; a window (250 ms) passes first.
    let wait = l.acquire(1000).unwrap_err();
    assert_eq!(wait, Duration::from_millis(250));
    assert_eq!(store.asks.borrow().len(), 1, "no ask within the window");
    assert!(l.acquire(200_000).is_err());
    assert_eq!(store.asks.borrow().len(), 1);
    assert_eq!(l.acquire(251_000), Err(POLL));
    assert_eq!(store.asks.borrow().len(), 2);
    // A wait longer than the window is kept.
    grant(&store, 0, 900);
    assert_eq!(l.acquire(252_000), Err(Duration::from_millis(900)));
}

#[test]
fn unspent_tokens_go_back_after_two_windows_and_when_dropped() {
    let (store, mut l) = leased(HUNDRED_PER_S, 1);
    let _ = l.acquire(0);
    grant(&store, 10, 0);
    l.settle(1000);
    assert_eq!(l.tokens(), 10);
    l.settle(400_000);
    assert_eq!(*store.given_back.borrow(), 0, "within two windows: kept");
    l.settle(502_000);
    assert_eq!(*store.given_back.borrow(), 10);
    assert_eq!(l.tokens(), 0);
    let (store, mut l) = leased(HUNDRED_PER_S, 1);
    let _ = l.acquire(0);
    grant(&store, 7, 0);
    assert_eq!(l.acquire(1000), Ok(()));
    drop(l);
    assert_eq!(*store.given_back.borrow(), 6);
}

#[test]
fn down_open_takes_this_nodes_share_and_is_shared_again_when_granted() {
    let (store, mut l) = leased(HUNDRED_PER_S, 4);
    let _ = l.acquire(0);
    *store.next.borrow_mut() = Some(Answer::Down(Fallback::Open));
    // 100/s over 4 nodes: a burst of 25, then one each 40 ms.
    let passed = (0..100).filter(|i| l.acquire(1000 + i).is_ok()).count();
    assert_eq!(passed, 25);
    assert_eq!(l.down(), Some(Fallback::Open));
    let asks = store.asks.borrow().len();
    // Asked again only after a second.
    let _ = l.acquire(900_000);
    assert_eq!(store.asks.borrow().len(), asks);
    let _ = l.acquire(1_002_000);
    assert_eq!(store.asks.borrow().len(), asks + 1);
    grant(&store, 5, 0);
    assert_eq!(l.acquire(1_003_000), Ok(()));
    assert_eq!(l.down(), None);
    assert_eq!(l.tokens(), 4);
}

#[test]
fn down_closed_passes_nothing_until_granted() {
    let (store, mut l) = leased(HUNDRED_PER_S, 1);
    let _ = l.acquire(0);
    *store.next.borrow_mut() = Some(Answer::Down(Fallback::Closed));
    let wait = l.acquire(1000).unwrap_err();
    assert_eq!(wait, Duration::from_millis(1000));
    assert!((0..50).all(|i| l.acquire(2000 + i * 10_000).is_err()));
    assert_eq!(
        l.acquire(1_001_000),
        Err(POLL),
        "asked again after a second"
    );
    grant(&store, 3, 0);
    assert_eq!(l.acquire(1_002_000), Ok(()));
    // Tokens of a fallback are never given back (none were leased).
    drop(l);
    assert_eq!(*store.given_back.borrow(), 2);
}

#[test]
fn the_share_of_a_rate() {
    assert_eq!(
        share(HUNDRED_PER_S, 3),
        Rate::Per {
            count: 33,
            per_ms: 1000
        }
    );
    assert_eq!(
        share(
            Rate::Per {
                count: 2,
                per_ms: 1000
            },
            5
        ),
        Rate::Per {
            count: 1,
            per_ms: 1000
        }
    );
    assert_eq!(share(Rate::Unlimited, 3), Rate::Unlimited);
}

fn slots(nodes: u64) -> (Rc<Store>, Slots) {
    let store = Rc::new(Store {
        nodes,
        ..Store::default()
    });
    let s = Slots::new(Rc::new(Source(store.clone())), "q".into());
    (store, s)
}

#[test]
fn a_shared_connection_limit_allows_what_was_claimed() {
    let (store, mut s) = slots(1);
    assert_eq!(
        s.allowed(0, 10, 4, 0),
        0,
        "nothing before the claim is answered"
    );
    assert_eq!(*store.asks.borrow(), [4]);
    assert_eq!(s.wait(0), POLL);
    grant(&store, 4, 0);
    assert_eq!(s.allowed(1000, 10, 4, 0), 4);
    // Wanting more asks again after a window, not before.
    assert_eq!(s.allowed(2000, 10, 6, 4), 4);
    assert_eq!(store.asks.borrow().len(), 1);
    assert_eq!(s.allowed(251_000, 10, 6, 4), 4);
    assert_eq!(*store.asks.borrow(), [4, 6]);
    // Granted less (others hold the rest): no ask for more until the renewal.
    grant(&store, 5, 0);
    assert_eq!(s.allowed(252_000, 10, 6, 4), 5);
    assert_eq!(s.allowed(600_000, 10, 6, 5), 5);
    assert_eq!(store.asks.borrow().len(), 2);
    assert_eq!(s.allowed(1_252_000, 10, 6, 5), 5);
    assert_eq!(*store.asks.borrow(), [4, 6, 6], "renewed after a second");
    grant(&store, 6, 0);
    // Idle: released at once (after the window), and once released, quiet.
    assert_eq!(s.allowed(1_600_000, 10, 0, 0), 6);
    assert_eq!(*store.asks.borrow(), [4, 6, 6, 0]);
    grant(&store, 0, 0);
    assert_eq!(s.allowed(1_601_000, 10, 0, 0), 0);
    assert_eq!(s.allowed(5_000_000, 10, 0, 0), 0);
    assert_eq!(store.asks.borrow().len(), 4);
}

#[test]
fn a_shared_connection_limit_falls_back_and_a_dropped_claim_is_released() {
    let (store, mut s) = slots(3);
    let _ = s.allowed(0, 10, 4, 0);
    *store.next.borrow_mut() = Some(Answer::Down(Fallback::Open));
    assert_eq!(s.allowed(1000, 10, 4, 0), 3, "a third of 10");
    let (store, mut s) = slots(3);
    let _ = s.allowed(0, 10, 4, 0);
    *store.next.borrow_mut() = Some(Answer::Down(Fallback::Closed));
    assert_eq!(s.allowed(1000, 10, 4, 2), 2, "no new connection");
    grant(&store, 3, 0);
    let _ = s.allowed(1_001_000, 10, 4, 2);
    assert_eq!(s.allowed(1_002_000, 10, 4, 2), 3, "shared again");
    let asks = store.asks.borrow().len();
    drop(s);
    assert_eq!(store.asks.borrow().len(), asks + 1);
    assert_eq!(store.asks.borrow().last(), Some(&0), "released");
}
