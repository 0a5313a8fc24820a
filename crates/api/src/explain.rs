//! hyper answers a request it cannot parse itself, before any of our code sees it: a
//! malformed head (400), a head over the cap (431), a URI too long (414). It sends a
//! head alone, with `content-length: 0`. Every other error of the API carries
//! `{"error": {"code", "message"}}` so clients can branch on the code; this connection
//! wrapper gives hyper's automatic answers that body too, rewriting them on their way
//! out. hyper offers no hook for them, and the connection's IO is the one place that
//! sees them.
//!
//! Only a bodiless 400, 414 or 431 head is rewritten: every answer the router builds
//! has a JSON body (and so a non-zero length and a content type), so none is touched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{ErrorBody, ErrorDetail};

/// A connection's IO whose writes of hyper's automatic error answers carry a JSON body.
pub struct Explained<T> {
    io: T,
    /// An answer being written in place of the head hyper gave.
    rewritten: Option<Rewritten>,
}

struct Rewritten {
    bytes: Vec<u8>,
    written: usize,
    /// How many of hyper's bytes it stands for: reported written once all of it is.
    stands_for: usize,
}

impl<T> Explained<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            rewritten: None,
        }
    }
}

/// The answer to send instead of `head`, if `head` is one of hyper's automatic answers
/// to a request it could not parse.
pub fn explain(head: &[u8]) -> Option<Vec<u8>> {
    let (code, message) = match head.get(..13)? {
        b"HTTP/1.1 400 " => (
            "malformed_request",
            "the request's head is not valid HTTP/1.1".to_owned(),
        ),
        b"HTTP/1.1 414 " => ("uri_too_long", "the request's URI is too long".to_owned()),
        b"HTTP/1.1 431 " => (
            "header_too_large",
            format!(
                "the request's head is over {} bytes",
                crate::READ_BUFFER_MAX_BYTES
            ),
        ),
        _ => return None,
    };
    let head = std::str::from_utf8(head.strip_suffix(b"\r\n\r\n")?).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut kept = Vec::new();
    let mut bodiless = false;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        if name.eq_ignore_ascii_case("content-length") {
            if value.trim() != "0" {
                return None;
            }
            bodiless = true;
        } else if name.eq_ignore_ascii_case("content-type")
            || name.eq_ignore_ascii_case("transfer-encoding")
        {
            return None;
        } else if !name.eq_ignore_ascii_case("connection") {
            kept.push(line);
        }
    }
    if !bodiless {
        return None;
    }
    let body = serde_json::to_vec(&ErrorBody {
        error: ErrorDetail { code, message },
    })
    .ok()?;
    let mut answer = Vec::with_capacity(head.len() + body.len() + 96);
    answer.extend_from_slice(status_line.as_bytes());
    answer.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
    answer.extend_from_slice(body.len().to_string().as_bytes());
    // hyper closes the connection after such an answer; say so.
    answer.extend_from_slice(b"\r\nconnection: close\r\n");
    for line in kept {
        answer.extend_from_slice(line.as_bytes());
        answer.extend_from_slice(b"\r\n");
    }
    answer.extend_from_slice(b"\r\n");
    answer.extend_from_slice(&body);
    Some(answer)
}

impl<T: AsyncWrite + Unpin> Explained<T> {
    /// Writes what is left of a rewritten answer; `Ready(Some(n))` once all of it is
    /// written (standing for `n` of hyper's bytes), `Ready(None)` if there is none.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<usize>>> {
        let Some(rewritten) = self.rewritten.as_mut() else {
            return Poll::Ready(Ok(None));
        };
        while rewritten.written < rewritten.bytes.len() {
            match ready!(
                Pin::new(&mut self.io).poll_write(cx, &rewritten.bytes[rewritten.written..])
            ) {
                Ok(0) => {
                    self.rewritten = None;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => rewritten.written += n,
                Err(error) => {
                    self.rewritten = None;
                    return Poll::Ready(Err(error));
                }
            }
        }
        let stands_for = rewritten.stands_for;
        self.rewritten = None;
        Poll::Ready(Ok(Some(stands_for)))
    }

    /// Starts writing `explain(buf)` in place of `buf` if it is one of hyper's answers.
    fn rewrite(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Option<Poll<io::Result<usize>>> {
        if self.rewritten.is_none() {
            let bytes = explain(buf)?;
            self.rewritten = Some(Rewritten {
                bytes,
                written: 0,
                stands_for: buf.len(),
            });
        }
        // hyper offers the same bytes again after a `Pending`; report no more of them
        // written than it offers.
        Some(
            self.drain(cx)
                .map_ok(|stands_for| stands_for.unwrap_or(0).min(buf.len())),
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Explained<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Explained<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(result) = self.rewrite(cx, buf) {
            return result;
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // hyper's automatic answer is a head alone: one slice.
        if let Some(first) = bufs.iter().find(|buf| !buf.is_empty())
            && let Some(result) = self.rewrite(cx, first)
        {
            return result;
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const HYPERS_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Sun, 06 Dec 2026 05:00:00 GMT\r\n\r\n";

    fn split(answer: &[u8]) -> (String, serde_json::Value) {
        let text = std::str::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), serde_json::from_str(body).unwrap())
    }

    #[test]
    fn hypers_automatic_answers_get_the_apis_error_body() {
        for (status, code) in [
            ("400 Bad Request", "malformed_request"),
            ("414 URI Too Long", "uri_too_long"),
            ("431 Request Header Fields Too Large", "header_too_large"),
        ] {
            let head = format!(
                "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\ndate: Sun, 06 Dec 2026 05:00:00 GMT\r\n\r\n"
            );
            let answer = explain(head.as_bytes()).expect(status);
            let (head, body) = split(&answer);
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status}\r\n")),
                "{head}"
            );
            assert_eq!(body["error"]["code"], code, "{body}");
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .unwrap();
            assert_eq!(length.parse::<usize>().unwrap(), body.to_string().len());
            assert_eq!(head.matches("connection: close").count(), 1, "{head}");
            assert!(head.contains("\r\ndate: "), "{head}");
            assert!(
                head.contains("\r\ncontent-type: application/json"),
                "{head}"
            );
        }
    }

    #[test]
    fn answers_with_a_body_and_other_statuses_pass_untouched() {
        for head in [
            // The router's own 400: a JSON body.
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 57\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            // Not a whole head.
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n",
            b"{\"error\":",
        ] {
            assert_eq!(explain(head), None, "{}", String::from_utf8_lossy(head));
        }
    }

    /// Through a pipe that takes 7 bytes at a time, the rewritten answer arrives whole,
    /// the write reports hyper's bytes written, and what follows is untouched.
    #[tokio::test]
    async fn a_rewritten_answer_arrives_whole_through_a_narrow_pipe() {
        let (near, mut far) = tokio::io::duplex(7);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut io = Explained::new(near);
        let written = io.write(HYPERS_431).await.unwrap();
        assert_eq!(written, HYPERS_431.len());
        io.write_all(b"after").await.unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        let got = reader.await.unwrap();
        let expected = [explain(HYPERS_431).unwrap(), b"after".to_vec()].concat();
        assert_eq!(got, expected);
    }
}
