//! The `:authority` repair in front of the registration socket. Kubelet's plugin watcher dials
//! that socket with grpc-go and the bare socket path as its target, so its requests carry the
//! path as `:authority`. A path is not a URI authority, and the HTTP/2 layer under tonic
//! rejects such a request with PROTOCOL_ERROR before any service sees it (kubelet's CSI client
//! sends `localhost`; its plugin watcher does not). Between the socket and the server, this
//! module re-encodes each header block the client sends with `:authority: localhost` and
//! passes every other byte through unchanged. Only the registration socket goes through it.

use std::io;

use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};
use tracing::debug;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 endpoint accepts; re-encoded blocks are cut to it.
const MAX_FRAME: usize = 16_384;
/// A header block arriving in pieces is held in memory; a client may not make it huge.
const MAX_BLOCK: usize = 1 << 20;
const AUTHORITY: &[u8] = b":authority";
const LOCALHOST: &[u8] = b"localhost";

/// The connections accepted on `listener`, each handed on as the server's end of an in-memory
/// pipe that a task feeds with the client's bytes, repaired.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<DuplexStream>> {
    UnixListenerStream::new(listener).map(|conn| conn.map(splice))
}

fn splice(client: UnixStream) -> DuplexStream {
    let (server_end, ours) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut rx, mut tx) = tokio::io::split(ours);
        let up = async {
            let res = rewrite(&mut client_rx, &mut tx).await;
            let _ = tx.shutdown().await;
            res
        };
        let down = async {
            let res = tokio::io::copy(&mut rx, &mut client_tx).await;
            let _ = client_tx.shutdown().await;
            res
        };
        let (up, down) = tokio::join!(up, down);
        if let Err(e) = up {
            debug!(error = %e, "registration connection: client stream");
        }
        if let Err(e) = down {
            debug!(error = %e, "registration connection: server stream");
        }
    });
    server_end
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// A header block whose HEADERS frame came without END_HEADERS: CONTINUATION frames follow.
struct Pending {
    flags: u8,
    stream: u32,
    priority: Vec<u8>,
    block: Vec<u8>,
}

/// Copies an HTTP/2 client's byte stream from `r` to `w`, re-encoding header blocks with a
/// valid `:authority`. Anything that is not HTTP/2 with prior knowledge is copied as is, for
/// the server to refuse.
async fn rewrite<R, W>(r: &mut R, w: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; PREFACE.len()];
    let mut got = 0;
    while got < preface.len() {
        let n = r.read(&mut preface[got..]).await?;
        if n == 0 {
            return w.write_all(&preface[..got]).await;
        }
        got += n;
    }
    w.write_all(&preface).await?;
    if &preface != PREFACE {
        tokio::io::copy(r, w).await?;
        return Ok(());
    }
    // The client's encoder and our decoder see the same blocks, so their tables agree; the
    // server's decoder mirrors our encoder.
    let mut decoder = Decoder::new();
    let mut encoder = Encoder::new();
    let mut pending: Option<Pending> = None;
    loop {
        let mut head = [0u8; 9];
        match r.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        match (kind, pending.take()) {
            (FRAME_HEADERS, None) => {
                let (priority, fragment) = split_headers(flags, &payload)?;
                let block = Pending {
                    flags,
                    stream,
                    priority,
                    block: fragment.to_vec(),
                };
                if flags & FLAG_END_HEADERS != 0 {
                    emit(w, &mut decoder, &mut encoder, block).await?;
                } else {
                    pending = Some(block);
                }
            }
            (FRAME_CONTINUATION, Some(mut block)) if stream == block.stream => {
                block.block.extend_from_slice(&payload);
                if block.block.len() > MAX_BLOCK {
                    return Err(invalid("header block over 1 MiB"));
                }
                if flags & FLAG_END_HEADERS != 0 {
                    emit(w, &mut decoder, &mut encoder, block).await?;
                } else {
                    pending = Some(block);
                }
            }
            // HTTP/2 allows nothing between a header block's frames.
            (_, Some(_)) | (FRAME_CONTINUATION, None) => {
                return Err(invalid("frame out of place within a header block"));
            }
            _ => {
                w.write_all(&head).await?;
                w.write_all(&payload).await?;
            }
        }
    }
}

/// The priority fields (if any) and the header block fragment of a HEADERS frame, without
/// its padding.
fn split_headers(flags: u8, payload: &[u8]) -> io::Result<(Vec<u8>, &[u8])> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & FLAG_PADDED != 0 {
        let pad = *payload
            .first()
            .ok_or_else(|| invalid("padded HEADERS frame without padding length"))?;
        start = 1;
        end = end
            .checked_sub(pad as usize)
            .ok_or_else(|| invalid("HEADERS padding longer than the frame"))?;
    }
    let mut priority = Vec::new();
    if flags & FLAG_PRIORITY != 0 {
        priority = payload
            .get(start..start + 5)
            .ok_or_else(|| invalid("short HEADERS priority"))?
            .to_vec();
        start += 5;
    }
    let fragment = payload
        .get(start..end)
        .ok_or_else(|| invalid("HEADERS frame shorter than its fields"))?;
    Ok((priority, fragment))
}

/// Decodes a whole header block, re-encodes it with `:authority: localhost`, and writes it as
/// a HEADERS frame (unpadded, its END_STREAM and priority kept) and CONTINUATION frames.
async fn emit<W: AsyncWrite + Unpin>(
    w: &mut W,
    decoder: &mut Decoder<'_>,
    encoder: &mut Encoder<'_>,
    block: Pending,
) -> io::Result<()> {
    let fields = decoder
        .decode(&block.block)
        .map_err(|e| invalid(format!("header block: {e:?}")))?;
    let encoded = encoder.encode(fields.iter().map(|(name, value)| {
        (
            name.as_slice(),
            if name == AUTHORITY {
                LOCALHOST
            } else {
                value.as_slice()
            },
        )
    }));
    let mut first = block.priority;
    let room = MAX_FRAME - first.len();
    let (head, mut rest) = encoded.split_at(room.min(encoded.len()));
    first.extend_from_slice(head);
    let mut flags = block.flags & !(FLAG_PADDED | FLAG_END_HEADERS);
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    write_frame(w, FRAME_HEADERS, flags, block.stream, &first).await?;
    while !rest.is_empty() {
        let (piece, tail) = rest.split_at(MAX_FRAME.min(rest.len()));
        rest = tail;
        let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        write_frame(w, FRAME_CONTINUATION, flags, block.stream, piece).await?;
    }
    Ok(())
}

async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &[u8],
) -> io::Result<()> {
    let len = (payload.len() as u32).to_be_bytes();
    let id = stream.to_be_bytes();
    let head = [
        len[1], len[2], len[3], kind, flags, id[0], id[1], id[2], id[3],
    ];
    w.write_all(&head).await?;
    w.write_all(payload).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKET_PATH: &[u8] = b"/var/lib/kubelet/plugins_registry/blockcsi.dev-reg.sock";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn request_headers(authority: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        [
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/pluginregistration.Registration/GetInfo"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect()
    }

    /// Splits a byte stream (after the preface) into (kind, flags, stream, payload) frames.
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    async fn run(input: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        rewrite(&mut &input[..], &mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn authority_becomes_localhost_and_everything_else_passes() {
        let mut client = Encoder::new();
        let mut input = PREFACE.to_vec();
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        input.extend(&settings);
        let fields = request_headers(SOCKET_PATH);
        let block = client.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block));
        let data = frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]);
        input.extend(&data);
        // A second request on the connection refers to the client's table entries.
        let block = client.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS | 0x1, 3, &block));

        let out = run(&input).await.unwrap();
        assert_eq!(&out[..24], PREFACE);
        let got = frames(&out[24..]);
        assert_eq!(got.len(), 4);
        assert_eq!(frame(got[0].0, got[0].1, got[0].2, &got[0].3), settings);
        assert_eq!(frame(got[2].0, got[2].1, got[2].2, &got[2].3), data);
        let mut server = Decoder::new();
        let want = request_headers(LOCALHOST);
        for (i, stream, flags) in [(1, 1, FLAG_END_HEADERS), (3, 3, FLAG_END_HEADERS | 0x1)] {
            assert_eq!(
                (got[i].0, got[i].1, got[i].2),
                (FRAME_HEADERS, flags, stream)
            );
            assert_eq!(server.decode(&got[i].3).unwrap(), want);
        }
    }

    #[tokio::test]
    async fn padded_priority_and_continuation_frames_are_joined() {
        let fields = request_headers(SOCKET_PATH);
        let block = Encoder::new().encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let (a, b) = block.split_at(block.len() / 2);
        let mut payload = vec![3u8]; // padding length
        payload.extend([0x80, 0, 0, 0, 15]); // priority: exclusive, weight 15
        payload.extend(a);
        payload.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            FRAME_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | 0x1,
            5,
            &payload,
        ));
        input.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 5, b));

        let out = run(&input).await.unwrap();
        let got = frames(&out[24..]);
        assert_eq!(got.len(), 1);
        let (kind, flags, stream, payload) = &got[0];
        assert_eq!(
            (*kind, *flags, *stream),
            (FRAME_HEADERS, FLAG_PRIORITY | FLAG_END_HEADERS | 0x1, 5)
        );
        assert_eq!(&payload[..5], &[0x80, 0, 0, 0, 15]);
        assert_eq!(
            Decoder::new().decode(&payload[5..]).unwrap(),
            request_headers(LOCALHOST)
        );
    }

    #[tokio::test]
    async fn large_blocks_are_cut_into_continuations() {
        let big = vec![b'x'; 40_000];
        let mut fields = request_headers(SOCKET_PATH);
        fields.push((b"x-big".to_vec(), big.clone()));
        let block = Encoder::new().encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut input = PREFACE.to_vec();
        input.extend(frame(FRAME_HEADERS, 0, 1, &block[..MAX_FRAME]));
        input.extend(frame(
            FRAME_CONTINUATION,
            0,
            1,
            &block[MAX_FRAME..2 * MAX_FRAME],
        ));
        input.extend(frame(
            FRAME_CONTINUATION,
            FLAG_END_HEADERS,
            1,
            &block[2 * MAX_FRAME..],
        ));

        let out = run(&input).await.unwrap();
        let got = frames(&out[24..]);
        assert!(got.len() >= 3, "{} frames", got.len());
        assert!(got.iter().all(|f| f.3.len() <= MAX_FRAME));
        assert_eq!(got[0].0, FRAME_HEADERS);
        assert!(got[1..]
            .iter()
            .all(|f| f.0 == FRAME_CONTINUATION && f.2 == 1));
        assert!(got[..got.len() - 1]
            .iter()
            .all(|f| f.1 & FLAG_END_HEADERS == 0));
        assert_eq!(got[got.len() - 1].1, FLAG_END_HEADERS);
        let joined: Vec<u8> = got.iter().flat_map(|f| f.3.clone()).collect();
        let mut want = request_headers(LOCALHOST);
        want.push((b"x-big".to_vec(), big));
        assert_eq!(Decoder::new().decode(&joined).unwrap(), want);
    }

    #[tokio::test]
    async fn broken_framing_is_refused_and_non_http2_passes_untouched() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(FRAME_HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, &[1, 2, 3]));
        assert_eq!(
            run(&input).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );

        let mut input = PREFACE.to_vec();
        input.extend(frame(
            FRAME_HEADERS,
            FLAG_PADDED | FLAG_END_HEADERS,
            1,
            &[9, 0x82],
        ));
        assert_eq!(
            run(&input).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );

        let http1 = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec();
        assert_eq!(run(&http1).await.unwrap(), http1);
        assert_eq!(run(b"PRI").await.unwrap(), b"PRI");
    }
}
