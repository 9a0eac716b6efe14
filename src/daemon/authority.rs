//! The `:authority` repair in front of the registration socket. Kubelet's plugin watcher dials
//! that socket with grpc-go and the bare socket path as its target, so its requests carry the
//! path as `:authority`. A path is not a URI authority, and the HTTP/2 layer under tonic
//! rejects such a request with PROTOCOL_ERROR before any service sees it (kubelet's CSI client
//! sends `localhost`; its plugin watcher does not). Between the socket and the server, this
//! module re-encodes each header block the client sends with `:authority: localhost` and
//! passes every other byte through unchanged. The registration socket and the CSI socket both
//! go through it: grpcio and other gRPC C-core clients send the percent-encoded socket path.
//!
//! h2 has no option to accept such an authority (its check in the server's request conversion
//! is unconditional), and the bytes cannot be patched in place: HPACK strings may be Huffman
//! coded and the value's length counts towards the dynamic table both ends keep in step.
//! So the blocks are re-encoded, and the encoder obeys what the server's SETTINGS allow.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use loona_hpack::encoder::encode_integer_into;
use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};
use tracing::debug;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 endpoint accepts until its SETTINGS say more (RFC 9113 4.2).
const MAX_FRAME: usize = 16_384;
/// The largest SETTINGS_MAX_FRAME_SIZE a peer may announce.
const MAX_FRAME_LIMIT: usize = (1 << 24) - 1;
/// The HPACK table size both ends start with (RFC 9113 6.5.2); our encoder never uses more,
/// even when the server allows it, since a CSI request's headers fit in it many times over.
const TABLE_SIZE: usize = 4096;
const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
/// A frame from the server is held in memory while it is parsed; its SETTINGS bound it, and
/// tonic's server never sends frames near this size.
const MAX_SERVER_FRAME: usize = MAX_FRAME_LIMIT;
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
        let settings = Settings::default();
        let up = async {
            let res = rewrite(&mut client_rx, &mut tx, &settings).await;
            let _ = tx.shutdown().await;
            res
        };
        let down = async {
            let res = forward(&mut rx, &mut client_tx, &settings).await;
            let _ = client_tx.shutdown().await;
            res
        };
        let (up, down) = tokio::join!(up, down);
        if let Err(e) = up {
            debug!(error = %e, "repaired connection: client stream");
        }
        if let Err(e) = down {
            debug!(error = %e, "repaired connection: server stream");
        }
    });
    server_end
}

/// What one SETTINGS frame of the server changes for the header blocks we send it.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Limits {
    table_size: Option<usize>,
    max_frame: Option<usize>,
}

/// The server's SETTINGS frames the client has not acknowledged yet, oldest first. A setting
/// binds the client only from its acknowledgement on (RFC 9113 6.5.3), and the client
/// acknowledges in order; the server's stream records each frame here before the client can
/// see it, so an acknowledgement always finds its frame.
#[derive(Default, Clone)]
struct Settings(Arc<Mutex<VecDeque<Limits>>>);

impl Settings {
    fn sent(&self, limits: Limits) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(limits);
    }

    fn acknowledged(&self) -> Option<Limits> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }
}

/// The limits a SETTINGS payload sets; values out of range are the server's error to make and
/// are clamped rather than trusted.
fn parse_settings(payload: &[u8]) -> Limits {
    let mut limits = Limits::default();
    for entry in payload.chunks_exact(6) {
        let id = u16::from_be_bytes([entry[0], entry[1]]);
        let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]) as usize;
        match id {
            SETTINGS_HEADER_TABLE_SIZE => limits.table_size = Some(value),
            SETTINGS_MAX_FRAME_SIZE => {
                limits.max_frame = Some(value.clamp(MAX_FRAME, MAX_FRAME_LIMIT))
            }
            _ => {}
        }
    }
    limits
}

/// Copies the server's byte stream to the client frame by frame, noting each SETTINGS frame
/// before the client can receive it.
async fn forward<R, W>(r: &mut R, w: &mut W, settings: &Settings) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut payload = Vec::new();
    loop {
        let mut head = [0u8; 9];
        match r.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        if len > MAX_SERVER_FRAME {
            return Err(invalid("server frame over the protocol limit"));
        }
        payload.resize(len, 0);
        r.read_exact(&mut payload).await?;
        if head[3] == FRAME_SETTINGS && head[4] & FLAG_ACK == 0 {
            settings.sent(parse_settings(&payload));
        }
        w.write_all(&head).await?;
        w.write_all(&payload).await?;
    }
}

/// Our HPACK encoder and the framing of what it produces, as far as the server has allowed.
struct Outgoing<'a> {
    encoder: Encoder<'a>,
    table_size: usize,
    /// The smallest table size since the last block, when it changed: the next block starts
    /// with that and then the current size (RFC 7541 4.2).
    lowest: Option<usize>,
    max_frame: usize,
}

impl Outgoing<'_> {
    fn new() -> Self {
        Outgoing {
            encoder: Encoder::new(),
            table_size: TABLE_SIZE,
            lowest: None,
            max_frame: MAX_FRAME,
        }
    }

    fn apply(&mut self, limits: Limits) {
        if let Some(size) = limits.table_size {
            let size = size.min(TABLE_SIZE);
            if size != self.table_size {
                self.lowest = Some(self.lowest.map_or(size, |l| l.min(size)));
                self.table_size = size;
                self.encoder.set_max_table_size(size);
            }
        }
        if let Some(max) = limits.max_frame {
            self.max_frame = max;
        }
    }

    /// The dynamic table size updates the next block must start with.
    fn size_updates(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(lowest) = self.lowest.take() {
            for size in [lowest, self.table_size] {
                if size != lowest || out.is_empty() {
                    let _ = encode_integer_into(size, 5, 0x20, &mut out);
                }
            }
        }
        out
    }
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
async fn rewrite<R, W>(r: &mut R, w: &mut W, settings: &Settings) -> io::Result<()>
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
    let mut out = Outgoing::new();
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
                    emit(w, &mut decoder, &mut out, block).await?;
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
                    emit(w, &mut decoder, &mut out, block).await?;
                } else {
                    pending = Some(block);
                }
            }
            // HTTP/2 allows nothing between a header block's frames.
            (_, Some(_)) | (FRAME_CONTINUATION, None) => {
                return Err(invalid("frame out of place within a header block"));
            }
            (kind, None) => {
                if kind == FRAME_SETTINGS && flags & FLAG_ACK != 0 && stream == 0 {
                    // From here on the server holds the client to those settings.
                    if let Some(limits) = settings.acknowledged() {
                        out.apply(limits);
                    }
                }
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
    out: &mut Outgoing<'_>,
    block: Pending,
) -> io::Result<()> {
    let fields = decoder
        .decode(&block.block)
        .map_err(|e| invalid(format!("header block: {e:?}")))?;
    let mut encoded = out.size_updates();
    encoded.extend(out.encoder.encode(fields.iter().map(|(name, value)| {
        (
            name.as_slice(),
            if name == AUTHORITY {
                LOCALHOST
            } else {
                value.as_slice()
            },
        )
    })));
    let max_frame = out.max_frame;
    let mut first = block.priority;
    let room = max_frame - first.len();
    let (head, mut rest) = encoded.split_at(room.min(encoded.len()));
    first.extend_from_slice(head);
    let mut flags = block.flags & !(FLAG_PADDED | FLAG_END_HEADERS);
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    write_frame(w, FRAME_HEADERS, flags, block.stream, &first).await?;
    while !rest.is_empty() {
        let (piece, tail) = rest.split_at(max_frame.min(rest.len()));
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
        rewrite(&mut &input[..], &mut out, &Settings::default()).await?;
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
    async fn server_settings_bind_the_encoder_once_acknowledged() {
        let mut from_server = frame(
            FRAME_SETTINGS,
            0,
            0,
            &[0, 1, 0, 0, 0, 0, 0, 5, 0, 0, 0x4e, 0x20],
        );
        from_server.extend(frame(0x0, 0x1, 1, b"reply"));
        let settings = Settings::default();
        let mut to_client = Vec::new();
        forward(&mut &from_server[..], &mut to_client, &settings)
            .await
            .unwrap();
        assert_eq!(to_client, from_server);

        let mut client = Encoder::new();
        let encode = |client: &mut Encoder, fields: &[(Vec<u8>, Vec<u8>)]| {
            client.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
        };
        let mut big = request_headers(SOCKET_PATH);
        big.push((b"x-big".to_vec(), vec![b'y'; 30_000]));
        let mut input = PREFACE.to_vec();
        // Sent before the acknowledgement: the defaults still hold.
        let first = encode(&mut client, &request_headers(SOCKET_PATH));
        input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &first));
        input.extend(frame(FRAME_SETTINGS, FLAG_ACK, 0, &[]));
        let second = encode(&mut client, &big);
        input.extend(frame(FRAME_HEADERS, 0, 3, &second[..MAX_FRAME]));
        input.extend(frame(
            FRAME_CONTINUATION,
            FLAG_END_HEADERS,
            3,
            &second[MAX_FRAME..],
        ));
        let mut out = Vec::new();
        rewrite(&mut &input[..], &mut out, &settings).await.unwrap();

        let got = frames(&out[24..]);
        let kinds: Vec<_> = got.iter().map(|f| (f.0, f.1, f.2)).collect();
        assert_eq!(
            kinds,
            [
                (FRAME_HEADERS, FLAG_END_HEADERS, 1),
                (FRAME_SETTINGS, FLAG_ACK, 0),
                (FRAME_HEADERS, 0, 3),
                (FRAME_CONTINUATION, FLAG_END_HEADERS, 3),
            ]
        );
        // The announced 20000-byte frames are used, and the block after the acknowledgement
        // opens with a table size update to the announced 0.
        assert_eq!(got[2].3.len(), 20_000);
        assert_eq!(got[2].3[0], 0x20);
        let mut server = Decoder::new();
        assert_eq!(
            server.decode(&got[0].3).unwrap(),
            request_headers(LOCALHOST)
        );
        let joined: Vec<u8> = [got[2].3.clone(), got[3].3.clone()].concat();
        let mut want = request_headers(LOCALHOST);
        want.push((b"x-big".to_vec(), vec![b'y'; 30_000]));
        assert_eq!(server.decode(&joined).unwrap(), want);
    }

    #[test]
    fn size_updates_signal_the_lowest_then_the_current_size() {
        let mut out = Outgoing::new();
        assert!(out.size_updates().is_empty());
        out.apply(Limits {
            table_size: Some(100),
            max_frame: None,
        });
        out.apply(Limits {
            table_size: Some(1000),
            max_frame: None,
        });
        // 100 = 31 + 69 in the 5-bit prefix form; 1000 = 31 + 969 (0x49 | 0x80, 7).
        assert_eq!(out.size_updates(), [0x3f, 69, 0x3f, 0xc9, 0x07]);
        assert!(out.size_updates().is_empty());
        out.apply(Limits {
            table_size: Some(1 << 20),
            max_frame: Some(1 << 20),
        });
        assert_eq!(out.size_updates(), [0x3f, 0xe1, 0x1f]);
        assert_eq!((out.table_size, out.max_frame), (TABLE_SIZE, 1 << 20));
        assert_eq!(
            parse_settings(&[0, 5, 0x40, 0, 0, 0, 0, 1, 0, 0, 0, 7, 0, 9]),
            Limits {
                table_size: Some(7),
                max_frame: Some(MAX_FRAME_LIMIT),
            }
        );
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
