//! hyper answers a request it cannot parse itself, before any of our code sees it: a
//! malformed head (400), a head too large (431: over the cap, or over 100 header
//! fields), a URI too long (414). It sends a head alone, with `content-length: 0`. Every
//! other error of the API carries `{"error": {"code", "message"}}` so clients can branch
//! on the code; this connection wrapper gives hyper's automatic answers that body too,
//! rewriting them on their way out. hyper offers no hook for them, and the connection's
//! IO is the one place that sees them. (hyper 1.12 writes such an answer as one write of
//! the whole head, with `connection: close` on HTTP/1.1, and closes the connection.)
//!
//! Only a bodiless 400, 414 or 431 head is rewritten: every answer the router builds
//! carries a content type (its errors a JSON body), so none is touched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{ErrorBody, ErrorDetail};

/// A connection's IO whose writes of hyper's automatic error answers carry a JSON body.
///
/// A rewritten answer is taken whole when hyper writes its head (the write reports
/// hyper's bytes written, as a `BufWriter` would) and goes out on the next write, flush
/// or shutdown, before anything else: a `Pending` write has then written nothing.
pub struct Explained<T> {
    io: T,
    /// An answer being written in place of the head hyper gave.
    rewritten: Option<Rewritten>,
}

struct Rewritten {
    bytes: Vec<u8>,
    written: usize,
}

impl<T> Explained<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            rewritten: None,
        }
    }
}

/// The status and the answer to send instead of `head`, if `head` is one of hyper's
/// automatic answers to a request it could not parse.
pub fn explain(head: &[u8]) -> Option<(&'static str, Vec<u8>)> {
    let version = head.get(..9)?;
    if version != b"HTTP/1.1 " && version != b"HTTP/1.0 " {
        return None;
    }
    let (status, code, message) = match head.get(9..13)? {
        b"400 " => (
            "400",
            "malformed_request",
            "the request's head is not valid HTTP/1.1".to_owned(),
        ),
        b"414 " => (
            "414",
            "uri_too_long",
            "the request's URI is too long".to_owned(),
        ),
        b"431 " => (
            "431",
            "header_too_large",
            format!(
                "the request's head is too large: over {} bytes, or over 100 header fields",
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
    Some((status, answer))
}

impl<T: AsyncWrite + Unpin> Explained<T> {
    /// Writes what is left of a rewritten answer, if any.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(rewritten) = self.rewritten.as_mut() {
            if rewritten.written == rewritten.bytes.len() {
                self.rewritten = None;
                break;
            }
            let wrote = ready!(
                Pin::new(&mut self.io).poll_write(cx, &rewritten.bytes[rewritten.written..])
            );
            match wrote {
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
        Poll::Ready(Ok(()))
    }

    /// Takes `buf` whole, to go out as `explain(buf)`, if it is one of hyper's answers;
    /// starts writing it at once.
    fn rewrite(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Option<Poll<io::Result<usize>>> {
        let (status, bytes) = explain(buf)?;
        // These requests never reach the router's counters.
        metrics::counter!("stampede_http_unparsable_total", "status" => status).increment(1);
        self.rewritten = Some(Rewritten { bytes, written: 0 });
        Some(match self.drain(cx) {
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            // Taken: the rest goes out on the next write, flush or shutdown.
            _ => Poll::Ready(Ok(buf.len())),
        })
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
        ready!(self.drain(cx))?;
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
        ready!(self.drain(cx))?;
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

    /// What hyper 1.12 writes for a head over its cap.
    const HYPERS_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Sun, 06 Dec 2026 05:00:00 GMT\r\n\r\n";

    fn split(answer: &[u8]) -> (String, serde_json::Value) {
        let text = std::str::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), serde_json::from_str(body).unwrap())
    }

    #[test]
    fn hypers_automatic_answers_get_the_apis_error_body() {
        // hyper answers in HTTP/1.0, without `connection`, on a connection whose last
        // request was HTTP/1.0 keep-alive.
        for (version, connection) in [("1.1", "connection: close\r\n"), ("1.0", "")] {
            for (status, code) in [
                ("400 Bad Request", "malformed_request"),
                ("414 URI Too Long", "uri_too_long"),
                ("431 Request Header Fields Too Large", "header_too_large"),
            ] {
                let head = format!(
                    "HTTP/{version} {status}\r\n{connection}content-length: 0\r\ndate: Sun, 06 Dec 2026 05:00:00 GMT\r\n\r\n"
                );
                assert_explained(&head, &format!("HTTP/{version} {status}\r\n"), code);
            }
        }
    }

    /// `head` is rewritten: same status line, the API's body with `code`, a content type
    /// and length, `connection: close` once, hyper's other headers kept.
    fn assert_explained(head: &str, status_line: &str, code: &str) {
        let (_, answer) = explain(head.as_bytes()).expect(status_line);
        let (head, body) = split(&answer);
        assert!(head.starts_with(status_line), "{head}");
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

    /// Through a pipe that takes 7 bytes at a time, the rewritten answer arrives whole
    /// when only a flush follows the write.
    #[tokio::test]
    async fn a_flush_finishes_a_rewritten_answer() {
        let (near, mut far) = tokio::io::duplex(7);
        let (_, expected) = explain(HYPERS_431).unwrap();
        let reader = tokio::spawn(async move {
            let mut got = vec![0; expected.len()];
            far.read_exact(&mut got).await.unwrap();
            assert_eq!(got, expected);
        });
        let mut io = Explained::new(near);
        assert_eq!(io.write(HYPERS_431).await.unwrap(), HYPERS_431.len());
        io.flush().await.unwrap();
        reader.await.unwrap();
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
        let expected = [explain(HYPERS_431).unwrap().1, b"after".to_vec()].concat();
        assert_eq!(got, expected);
    }
}
