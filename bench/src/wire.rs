//! Reading SMTP lines off a glommio socket, for the bench's own SMTP programs (the
//! sink and the forward relay).

use std::time::Duration;

use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;

/// Reads what `stream` has into `input`: false at the end of the stream or after
/// `idle` of silence.
pub async fn read_more(
    stream: &mut TcpStream,
    input: &mut Vec<u8>,
    idle: Duration,
) -> std::io::Result<bool> {
    let mut chunk = [0u8; 16 << 10];
    let n = futures_lite::future::or(stream.read(&mut chunk), async {
        glommio::timer::sleep(idle).await;
        Ok(0)
    })
    .await?;
    input.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

/// Takes the first whole line of `input`, without its line ending.
pub fn take_line(input: &mut Vec<u8>) -> Option<String> {
    let lf = memchr::memchr(b'\n', input)?;
    let line: Vec<u8> = input.drain(..=lf).collect();
    Some(String::from_utf8_lossy(&line).trim_end().to_string())
}
