//! Time limits on the current executor: a future with a deadline, and a sleep. The
//! bottom of the engine's modules (it imports none of them), so that a module such as
//! `dns` can bound its waits without depending on the runtime.

use std::future::Future;
use std::io;
use std::time::Duration;

/// `fut`, or a `TimedOut` error after `limit`.
pub async fn deadline<T>(
    fut: impl Future<Output = io::Result<T>>,
    limit: Duration,
) -> io::Result<T> {
    futures_lite::future::or(fut, async {
        glommio::timer::sleep(limit).await;
        Err(io::ErrorKind::TimedOut.into())
    })
    .await
}

/// Waits `d` on the current executor.
pub async fn sleep(d: Duration) {
    glommio::timer::sleep(d).await;
}
