//! A compatibility shim for etcd 3.4's clientv3: for per-endpoint Maintenance calls
//! (`etcdctl endpoint status`, `defrag`, `snapshot save`, ... with `http://host:port`
//! endpoints) it dials `passthrough:///http://host:port`, so grpc-go sends the HTTP/2
//! `:authority` pseudo-header as `http://host:port`. grpc-go servers ignore that; the `h2`
//! crate rejects it as malformed (RST_STREAM PROTOCOL_ERROR). This wrapper sits between the
//! socket and the HTTP/2 server and rewrites such an authority *in place, with the same
//! encoded length*: the `://` after `http`/`https` becomes `B--` (same Huffman bit lengths,
//! 7+6+6), giving the valid authority `httpB--host:port`. Nothing reads the authority.
//! Because the length is unchanged, HPACK dynamic-table state on both sides stays identical.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// HPACK static table index of `:authority`.
const AUTHORITY_INDEX: usize = 1;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Preface,
    Frames,
    /// Not HTTP/2 with prior knowledge: pass bytes through untouched.
    Raw,
}

/// An HTTP/2 server-side connection whose incoming header blocks get the fix above.
pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    /// Bytes read from `inner` are `buf[start..end]`; the reader may have `buf[start..checked]`.
    /// Reads land in `buf` directly (allocated and zeroed once, grown only for a header frame
    /// longer than it), so a read costs one copy, into the reader's buffer.
    buf: Vec<u8>,
    start: usize,
    checked: usize,
    end: usize,
    /// Payload bytes still to come of a frame that needs no fix (only header blocks do), which
    /// go to the reader as they arrive.
    skip: usize,
}

/// Initial size of a connection's read buffer: a full frame at h2's default maximum size.
const BUF_SIZE: usize = FRAME_HEADER + 16 * 1024;

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, mode: Mode::Preface, buf: Vec::new(), start: 0, checked: 0, end: 0, skip: 0 }
    }

    /// Moves `checked` over the bytes that may go to the reader; false when more input is
    /// needed first.
    fn check(&mut self) -> bool {
        let before = self.checked;
        match self.mode {
            Mode::Raw => self.checked = self.end,
            Mode::Preface => {
                let got = &self.buf[self.start..self.end];
                let n = got.len().min(PREFACE.len());
                if got[..n] != PREFACE[..n] {
                    self.mode = Mode::Raw;
                    self.checked = self.end;
                } else if n == PREFACE.len() {
                    self.checked += PREFACE.len();
                    self.mode = Mode::Frames;
                    self.check_frames();
                }
            }
            Mode::Frames => self.check_frames(),
        }
        self.checked > before
    }

    fn check_frames(&mut self) {
        loop {
            let n = self.skip.min(self.end - self.checked);
            self.checked += n;
            self.skip -= n;
            if self.skip > 0 {
                return;
            }
            let rest = &mut self.buf[self.checked..self.end];
            if rest.len() < FRAME_HEADER {
                return;
            }
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (kind, flags) = (rest[3], rest[4]);
            if kind != TYPE_HEADERS && kind != TYPE_CONTINUATION {
                self.checked += FRAME_HEADER;
                self.skip = len;
                continue;
            }
            if rest.len() < FRAME_HEADER + len {
                return;
            }
            if let Some(block) = header_block(&mut rest[FRAME_HEADER..FRAME_HEADER + len], kind, flags) {
                patch_header_block(block);
            }
            self.checked += FRAME_HEADER + len;
        }
    }

    /// Makes room after `end` for the next read.
    fn make_room(&mut self) {
        if self.start == self.end {
            (self.start, self.checked, self.end) = (0, 0, 0);
        }
        if self.buf.is_empty() {
            self.buf = vec![0; BUF_SIZE];
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                (self.checked, self.end) = (self.checked - self.start, self.end - self.start);
                self.start = 0;
            } else {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
    }
}

/// The header block fragment of a HEADERS or CONTINUATION payload.
fn header_block(payload: &mut [u8], kind: u8, flags: u8) -> Option<&mut [u8]> {
    if kind == TYPE_CONTINUATION {
        return Some(payload);
    }
    let mut start = 0;
    let mut pad = 0;
    if flags & FLAG_PADDED != 0 {
        pad = *payload.first()? as usize;
        start = 1;
    }
    if flags & FLAG_PRIORITY != 0 {
        start += 5;
    }
    let end = payload.len().checked_sub(pad)?;
    payload.get_mut(start..end)
}

/// Reads an HPACK integer with an `n`-bit prefix at `*i`.
fn read_int(buf: &[u8], i: &mut usize, n: u32) -> Option<usize> {
    let max = (1usize << n) - 1;
    let mut v = (*buf.get(*i)? as usize) & max;
    *i += 1;
    if v < max {
        return Some(v);
    }
    let mut shift = 0;
    loop {
        let b = *buf.get(*i)?;
        *i += 1;
        v += ((b & 0x7f) as usize) << shift;
        shift += 7;
        if b & 0x80 == 0 || shift > 28 {
            return (b & 0x80 == 0).then_some(v);
        }
    }
}

/// Walks one header block fragment and fixes every complete `:authority` literal in it.
fn patch_header_block(block: &mut [u8]) {
    let mut i = 0;
    while i < block.len() {
        let b = block[i];
        let name_index = if b & 0x80 != 0 {
            if read_int(block, &mut i, 7).is_none() {
                return;
            }
            continue;
        } else if b & 0xc0 == 0x40 {
            read_int(block, &mut i, 6)
        } else if b & 0xe0 == 0x20 {
            if read_int(block, &mut i, 5).is_none() {
                return;
            }
            continue;
        } else {
            read_int(block, &mut i, 4)
        };
        let Some(name_index) = name_index else { return };
        if name_index == 0 && skip_string(block, &mut i).is_none() {
            return;
        }
        let Some((huffman, start, end)) = skip_string(block, &mut i) else { return };
        if name_index == AUTHORITY_INDEX {
            fix_authority(&mut block[start..end], huffman);
        }
    }
}

/// Skips an HPACK string; returns whether it is Huffman-coded and its byte range.
fn skip_string(block: &[u8], i: &mut usize) -> Option<(bool, usize, usize)> {
    let huffman = block.get(*i)? & 0x80 != 0;
    let len = read_int(block, i, 7)?;
    let start = *i;
    let end = start.checked_add(len).filter(|&e| e <= block.len())?;
    *i = end;
    Some((huffman, start, end))
}

/// (code, bit length) of the symbols involved, from RFC 7541 Appendix B.
const H: (u32, u32) = (0x27, 6);
const T: (u32, u32) = (0x9, 5);
const P: (u32, u32) = (0x2b, 6);
const S: (u32, u32) = (0x8, 5);
const COLON: (u32, u32) = (0x5c, 7);
const SLASH: (u32, u32) = (0x18, 6);
const UPPER_B: (u32, u32) = (0x5d, 7);
const DASH: (u32, u32) = (0x16, 6);

fn fix_authority(value: &mut [u8], huffman: bool) {
    if !huffman {
        for scheme in [&b"http"[..], b"https"] {
            if value.len() > scheme.len() + 3
                && value.starts_with(scheme)
                && &value[scheme.len()..scheme.len() + 3] == b"://"
            {
                value[scheme.len()..scheme.len() + 3].copy_from_slice(b"B--");
                return;
            }
        }
        return;
    }
    for scheme in [&[H, T, T, P][..], &[H, T, T, P, S]] {
        let mut bits = Bits::default();
        scheme.iter().chain(&[COLON, SLASH, SLASH]).for_each(|&(c, n)| bits.push(c, n));
        if bits.is_prefix_of(value) {
            let offset: u32 = scheme.iter().map(|&(_, n)| n).sum();
            let mut repl = Bits::default();
            [UPPER_B, DASH, DASH].iter().for_each(|&(c, n)| repl.push(c, n));
            repl.write_at(value, offset as usize);
            return;
        }
    }
}

/// A short big-endian bit string.
#[derive(Default)]
struct Bits(Vec<bool>);

impl Bits {
    fn push(&mut self, code: u32, n: u32) {
        (0..n).rev().for_each(|k| self.0.push((code >> k) & 1 == 1));
    }

    fn bit(buf: &[u8], i: usize) -> Option<bool> {
        buf.get(i / 8).map(|b| (b >> (7 - i % 8)) & 1 == 1)
    }

    fn is_prefix_of(&self, buf: &[u8]) -> bool {
        self.0.iter().enumerate().all(|(i, &b)| Self::bit(buf, i) == Some(b))
    }

    fn write_at(&self, buf: &mut [u8], offset: usize) {
        for (k, &b) in self.0.iter().enumerate() {
            let i = offset + k;
            let mask = 1u8 << (7 - i % 8);
            if b {
                buf[i / 8] |= mask;
            } else {
                buf[i / 8] &= !mask;
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.checked > this.start {
                let n = (this.checked - this.start).min(out.remaining());
                out.put_slice(&this.buf[this.start..this.start + n]);
                this.start += n;
                return Poll::Ready(Ok(()));
            }
            if this.end > this.start && this.check() {
                continue;
            }
            this.make_room();
            let mut rb = ReadBuf::new(&mut this.buf[this.end..]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                // EOF: hand over whatever is left as it is.
                this.mode = Mode::Raw;
                if this.check() {
                    continue;
                }
                return Poll::Ready(Ok(()));
            }
            this.end += n;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for AuthorityFix<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7541 Huffman encoding of `s`, for the few symbols these tests use.
    fn huffman(s: &str) -> Vec<u8> {
        let table = |c: char| match c {
            'h' => H,
            't' => T,
            'p' => P,
            's' => S,
            ':' => COLON,
            '/' => SLASH,
            'B' => UPPER_B,
            '-' => DASH,
            'l' => (0x28, 6),
            'o' => (0x7, 5),
            'c' => (0x4, 5),
            'a' => (0x3, 5),
            '1' => (0x1, 5),
            '2' => (0x2, 5),
            '3' => (0x19, 6),
            '7' => (0x1d, 6),
            '9' => (0x1f, 6),
            '0' => (0x0, 5),
            _ => panic!("no code for {c}"),
        };
        let mut bits = Bits::default();
        s.chars().for_each(|c| {
            let (code, n) = table(c);
            bits.push(code, n)
        });
        let mut out = vec![0xffu8; bits.0.len().div_ceil(8)];
        bits.write_at(&mut out, 0);
        out
    }

    fn literal_authority(value: &[u8], huff: bool) -> Vec<u8> {
        let mut block = vec![0x41]; // literal with incremental indexing, name index 1
        block.push(if huff { 0x80 } else { 0 } | value.len() as u8);
        block.extend_from_slice(value);
        block
    }

    #[test]
    fn plain_authority_is_fixed() {
        let mut block = vec![0x82, 0x86]; // :method GET, :scheme http (indexed)
        block.extend(literal_authority(b"http://127.0.0.1:2379", false));
        patch_header_block(&mut block);
        assert_eq!(&block[4..], b"httpB--127.0.0.1:2379");
    }

    #[test]
    fn huffman_authority_is_fixed_in_place() {
        let mut block = literal_authority(&huffman("http://localhost:2379"), true);
        let before = block.len();
        patch_header_block(&mut block);
        assert_eq!(block.len(), before);
        assert_eq!(&block[2..], huffman("httpB--localhost:2379").as_slice());
        let mut tls = literal_authority(&huffman("https://localhost:2379"), true);
        patch_header_block(&mut tls);
        assert_eq!(&tls[2..], huffman("httpsB--localhost:2379").as_slice());
    }

    #[test]
    fn valid_authorities_are_untouched() {
        for value in [huffman("localhost:2379"), b"127.0.0.1:2379".to_vec()] {
            let huff = value != b"127.0.0.1:2379";
            let mut block = literal_authority(&value, huff);
            let before = block.clone();
            patch_header_block(&mut block);
            assert_eq!(block, before);
        }
    }

    #[test]
    fn truncated_blocks_do_not_panic() {
        let full = literal_authority(b"http://127.0.0.1:2379", false);
        for n in 0..full.len() {
            patch_header_block(&mut full[..n].to_vec());
        }
    }

    /// The preface, a HEADERS frame with `http://h:1` as its authority, a DATA frame holding
    /// `http://x:1`, and another HEADERS frame.
    fn wire() -> Vec<u8> {
        let block = literal_authority(b"http://h:1", false);
        let mut wire = PREFACE.to_vec();
        let mut headers = vec![0, 0, block.len() as u8, TYPE_HEADERS, 0x4, 0, 0, 0, 1];
        headers.extend_from_slice(&block);
        let data = [0, 0, 10, 0x0, 0, 0, 0, 0, 1, b'h', b't', b't', b'p', b':', b'/', b'/', b'x', b':', b'1'];
        wire.extend_from_slice(&headers);
        wire.extend_from_slice(&data);
        wire.extend_from_slice(&headers);
        wire
    }

    /// Reads `input` through the fix, the underlying reads returning `chunk` bytes at most and
    /// the reader asking for `want` at most.
    async fn read_through(input: &[u8], chunk: usize, want: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let (client, server) = tokio::io::duplex(chunk);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut client = client;
            for piece in input.chunks(chunk) {
                client.write_all(piece).await.unwrap();
            }
        });
        let mut fixed = AuthorityFix::new(server);
        let mut out = Vec::new();
        let mut buf = vec![0u8; want];
        loop {
            let n = fixed.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        writer.await.unwrap();
        out
    }

    #[tokio::test]
    async fn stream_rewrites_headers_frames_only() {
        let wire = wire();
        let out = read_through(&wire, 64 * 1024, 64 * 1024).await;
        assert_eq!(out.len(), wire.len());
        let s = String::from_utf8_lossy(&out);
        assert_eq!(s.matches("httpB--h:1").count(), 2, "{s}");
        assert!(s.contains("http://x:1"), "DATA frames are not touched");
    }

    #[tokio::test]
    async fn frames_split_across_reads_come_out_the_same() {
        let wire = wire();
        let whole = read_through(&wire, 64 * 1024, 64 * 1024).await;
        for (chunk, want) in [(1, 1), (1, 100), (7, 3), (13, 1000), (100, 5)] {
            assert_eq!(read_through(&wire, chunk, want).await, whole, "chunk {chunk}, read {want}");
        }
    }

    #[tokio::test]
    async fn a_header_frame_longer_than_the_buffer_is_fixed_too() {
        let mut block = literal_authority(b"http://h:1", false);
        // A literal header without indexing, new name "x" with a 3 * BUF_SIZE value, before
        // the authority; its length as an HPACK integer with a 7-bit prefix.
        let long = 3 * BUF_SIZE;
        let mut filler = vec![0x00, 0x01, b'x', 0x7f];
        let mut v = long - 127;
        while v >= 128 {
            filler.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        filler.push(v as u8);
        filler.resize(filler.len() + long, b'a');
        filler.append(&mut block);
        let len = filler.len();
        let mut wire = PREFACE.to_vec();
        wire.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, TYPE_HEADERS, 0x4, 0, 0, 0, 1]);
        wire.extend_from_slice(&filler);
        let out = read_through(&wire, 4096, 1000).await;
        assert_eq!(out.len(), wire.len());
        assert!(out.ends_with(b"httpB--h:1"));
    }

    #[tokio::test]
    async fn other_protocols_pass_through() {
        let wire = b"GET /health HTTP/1.1\r\nHost: http://h:1\r\n\r\n".to_vec();
        assert_eq!(read_through(&wire, 5, 7).await, wire);
    }
}
