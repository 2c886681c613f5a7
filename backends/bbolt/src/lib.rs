//! A writer and a reader ([`read`]) for bbolt database files (the B+tree file format etcd keeps
//! its backend in), and etcd's snapshot layout on top of them ([`etcd`]).
//!
//! The writer builds a whole file at once from sorted buckets, the way a compacted bbolt file
//! looks: two meta pages (0 and 1, FNV-64a checksummed), an empty freelist (page 2), then every
//! bucket as a real B+tree (leaf pages, branch pages above them when one leaf is not enough;
//! a node bigger than a page spans contiguous overflow pages), and last the root bucket's tree
//! that names them. Every page below the high-water mark is reachable, so bbolt's consistency
//! check (`tx.Check`, run by `etcdctl snapshot status`) passes.

pub mod etcd;
pub mod read;

use std::collections::BTreeMap;

/// bbolt's page size here (etcd runs on 4 KiB-page machines).
pub const PAGE_SIZE: usize = 4096;

const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const PAGE_HEADER: usize = 16;
const ELEMENT: usize = 16;
const BRANCH_FLAG: u16 = 0x01;
const LEAF_FLAG: u16 = 0x02;
const META_FLAG: u16 = 0x04;
const FREELIST_FLAG: u16 = 0x10;
const BUCKET_LEAF_FLAG: u32 = 0x01;
/// Offset of the checksum in the meta struct: it covers the 56 bytes before it.
const META_CHECKSUM_AT: usize = 56;

/// One bucket: its keys in bytewise order with their values.
pub type Bucket = BTreeMap<Vec<u8>, Vec<u8>>;

/// FNV-1a, 64 bits (bbolt's meta checksum).
pub fn fnv64a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// An entry of a node: key, value, and for leaves whether the value is a bucket header.
struct Entry<'a> {
    key: &'a [u8],
    value: &'a [u8],
    bucket: bool,
}

struct Writer {
    /// Pages from page 3 on (the meta pages and the freelist are written last).
    pages: Vec<u8>,
    next: u64,
}

impl Writer {
    /// Writes one node as contiguous pages; returns its first page id.
    fn node(&mut self, flags: u16, body: &[u8], count: usize) -> u64 {
        let id = self.next;
        let len = PAGE_HEADER + body.len();
        let n = len.div_ceil(PAGE_SIZE).max(1);
        let start = self.pages.len();
        self.pages.resize(start + n * PAGE_SIZE, 0);
        let p = &mut self.pages[start..];
        p[0..8].copy_from_slice(&id.to_le_bytes());
        p[8..10].copy_from_slice(&flags.to_le_bytes());
        p[10..12].copy_from_slice(&(count as u16).to_le_bytes());
        p[12..16].copy_from_slice(&((n - 1) as u32).to_le_bytes());
        p[PAGE_HEADER..len].copy_from_slice(body);
        self.next += n as u64;
        id
    }

    /// Element array then key/value data; `pos` counts from each element to its key.
    fn leaf_body(entries: &[Entry<'_>]) -> Vec<u8> {
        let mut elems = Vec::with_capacity(entries.len() * ELEMENT);
        let mut data = Vec::new();
        let n = entries.len();
        for (i, e) in entries.iter().enumerate() {
            let pos = (n - i) * ELEMENT + data.len();
            elems.extend_from_slice(&(if e.bucket { BUCKET_LEAF_FLAG } else { 0 }).to_le_bytes());
            elems.extend_from_slice(&(pos as u32).to_le_bytes());
            elems.extend_from_slice(&(e.key.len() as u32).to_le_bytes());
            elems.extend_from_slice(&(e.value.len() as u32).to_le_bytes());
            data.extend_from_slice(e.key);
            data.extend_from_slice(e.value);
        }
        elems.extend_from_slice(&data);
        elems
    }

    fn branch_body(children: &[(Vec<u8>, u64)]) -> Vec<u8> {
        let mut elems = Vec::with_capacity(children.len() * ELEMENT);
        let mut data = Vec::new();
        let n = children.len();
        for (i, (key, pgid)) in children.iter().enumerate() {
            let pos = (n - i) * ELEMENT + data.len();
            elems.extend_from_slice(&(pos as u32).to_le_bytes());
            elems.extend_from_slice(&(key.len() as u32).to_le_bytes());
            elems.extend_from_slice(&pgid.to_le_bytes());
            data.extend_from_slice(key);
        }
        elems.extend_from_slice(&data);
        elems
    }

    /// Writes a B+tree of `entries` (sorted); returns its root page id.
    fn tree(&mut self, entries: &[Entry<'_>]) -> u64 {
        // Leaves: fill a page, but put at least one entry in each.
        let mut level: Vec<(Vec<u8>, u64)> = Vec::new();
        let mut i = 0;
        loop {
            let start = i;
            let mut size = PAGE_HEADER;
            while i < entries.len() {
                let add = ELEMENT + entries[i].key.len() + entries[i].value.len();
                if i > start && size + add > PAGE_SIZE {
                    break;
                }
                size += add;
                i += 1;
            }
            let chunk = &entries[start..i];
            let id = self.node(LEAF_FLAG, &Self::leaf_body(chunk), chunk.len());
            level.push((chunk.first().map_or_else(Vec::new, |e| e.key.to_vec()), id));
            if i >= entries.len() {
                break;
            }
        }
        while level.len() > 1 {
            let mut up = Vec::new();
            let mut i = 0;
            while i < level.len() {
                let start = i;
                let mut size = PAGE_HEADER;
                while i < level.len() {
                    let add = ELEMENT + level[i].0.len();
                    if i > start + 1 && size + add > PAGE_SIZE {
                        break;
                    }
                    size += add;
                    i += 1;
                }
                let chunk = &level[start..i];
                let id = self.node(BRANCH_FLAG, &Self::branch_body(chunk), chunk.len());
                up.push((chunk[0].0.clone(), id));
            }
            level = up;
        }
        level[0].1
    }
}

/// A bucket header pointing at a real (non-inline) tree.
fn bucket_header(root: u64) -> Vec<u8> {
    let mut v = root.to_le_bytes().to_vec();
    v.extend_from_slice(&0u64.to_le_bytes());
    v
}

/// The meta page `id` (0 or 1) for transaction `txid`.
fn meta_page(id: u64, root: u64, high_water: u64, txid: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    p[0..8].copy_from_slice(&id.to_le_bytes());
    p[8..10].copy_from_slice(&META_FLAG.to_le_bytes());
    let m = &mut p[PAGE_HEADER..];
    m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    m[4..8].copy_from_slice(&VERSION.to_le_bytes());
    m[8..12].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    // flags (12..16) stay 0; root bucket: root page, sequence 0.
    m[16..24].copy_from_slice(&root.to_le_bytes());
    m[32..40].copy_from_slice(&2u64.to_le_bytes()); // freelist page
    m[40..48].copy_from_slice(&high_water.to_le_bytes());
    m[48..56].copy_from_slice(&txid.to_le_bytes());
    let sum = fnv64a(&m[..META_CHECKSUM_AT]);
    m[META_CHECKSUM_AT..META_CHECKSUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
    p
}

/// A whole bbolt file holding `buckets` (top-level buckets by name).
pub fn write_db(buckets: &BTreeMap<Vec<u8>, Bucket>) -> Vec<u8> {
    let mut w = Writer {
        pages: Vec::new(),
        next: 3,
    };
    let mut headers = Vec::with_capacity(buckets.len());
    for (name, bucket) in buckets {
        let entries: Vec<Entry<'_>> = bucket
            .iter()
            .map(|(k, v)| Entry {
                key: k,
                value: v,
                bucket: false,
            })
            .collect();
        let root = w.tree(&entries);
        headers.push((name.as_slice(), bucket_header(root)));
    }
    let entries: Vec<Entry<'_>> = headers
        .iter()
        .map(|(k, v)| Entry {
            key: k,
            value: v,
            bucket: true,
        })
        .collect();
    let root = w.tree(&entries);
    let high_water = w.next;
    let mut out = Vec::with_capacity((high_water as usize) * PAGE_SIZE);
    out.extend_from_slice(&meta_page(0, root, high_water, 0));
    out.extend_from_slice(&meta_page(1, root, high_water, 1));
    let mut freelist = vec![0u8; PAGE_SIZE];
    freelist[0..8].copy_from_slice(&2u64.to_le_bytes());
    freelist[8..10].copy_from_slice(&FREELIST_FLAG.to_le_bytes());
    out.extend_from_slice(&freelist);
    out.extend_from_slice(&w.pages);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv64a(b""), 0xcbf29ce484222325);
        assert_eq!(fnv64a(b"a"), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn round_trips_through_a_reader() {
        let mut buckets = BTreeMap::new();
        let mut big = Bucket::new();
        for i in 0..3000u32 {
            big.insert(
                format!("key{i:06}").into_bytes(),
                vec![b'v'; (i % 7) as usize * 100],
            );
        }
        big.insert(b"huge".to_vec(), vec![b'h'; 10_000]);
        buckets.insert(b"big".to_vec(), big.clone());
        buckets.insert(b"empty".to_vec(), Bucket::new());
        let db = write_db(&buckets);
        assert_eq!(db.len() % PAGE_SIZE, 0);
        let meta = &db[PAGE_HEADER..];
        assert_eq!(u32_at(meta, 0), MAGIC);
        assert_eq!(u64_at(meta, 56), fnv64a(&meta[..56]));
        assert_eq!(u64_at(meta, 40) as usize * PAGE_SIZE, db.len());
        assert_eq!(read::read_db(&db).unwrap(), buckets);
    }

    /// The reader takes what bbolt itself writes but the writer never does: inline buckets,
    /// a newer second meta page, pages past the high-water mark in the file.
    #[test]
    fn reads_inline_buckets_and_the_newest_meta() {
        let mut buckets = BTreeMap::new();
        let mut small = Bucket::new();
        small.insert(b"k".to_vec(), b"v".to_vec());
        buckets.insert(b"tree".to_vec(), small.clone());
        let mut db = write_db(&buckets);
        // Page 3 is the "tree" bucket's leaf; rewrite the root bucket's leaf (page 4) so that
        // "inline" is an inline bucket holding the same leaf, as bbolt stores small buckets.
        let leaf = db[3 * PAGE_SIZE..3 * PAGE_SIZE + PAGE_HEADER + ELEMENT + 2].to_vec();
        let mut header = vec![0u8; 16];
        header.extend_from_slice(&leaf);
        let entries = [
            Entry {
                key: b"inline",
                value: &header,
                bucket: true,
            },
            Entry {
                key: b"tree",
                value: &bucket_header(3),
                bucket: true,
            },
        ];
        let body = Writer::leaf_body(&entries);
        let root = &mut db[4 * PAGE_SIZE..5 * PAGE_SIZE];
        root[10..12].copy_from_slice(&2u16.to_le_bytes());
        root[PAGE_HEADER..].fill(0);
        root[PAGE_HEADER..PAGE_HEADER + body.len()].copy_from_slice(&body);
        // Meta page 0 becomes the newer one; meta page 1 is torn (bad checksum).
        let m0 = meta_page(0, 4, 5, 7);
        db[..PAGE_SIZE].copy_from_slice(&m0);
        db[PAGE_SIZE + PAGE_HEADER + 48] ^= 0xff;
        db.extend_from_slice(&vec![0u8; 3 * PAGE_SIZE]);
        let got = read::read_db(&db).unwrap();
        assert_eq!(got.get(b"inline".as_slice()), Some(&small));
        assert_eq!(got.get(b"tree".as_slice()), Some(&small));
    }

    /// Truncated or corrupt files give errors, not panics or made-up data.
    #[test]
    fn refuses_damaged_files() {
        let mut buckets = BTreeMap::new();
        let mut b = Bucket::new();
        for i in 0..500u32 {
            b.insert(i.to_be_bytes().to_vec(), vec![7u8; 50]);
        }
        buckets.insert(b"key".to_vec(), b);
        let db = write_db(&buckets);
        assert!(
            read::read_db(&db[..db.len() - PAGE_SIZE]).is_err(),
            "truncated"
        );
        assert!(read::read_db(&[0u8; 100]).is_err(), "too short");
        let mut bad = db.clone();
        bad[PAGE_HEADER] ^= 1;
        bad[PAGE_SIZE + PAGE_HEADER] ^= 1;
        assert!(read::read_db(&bad).is_err(), "both metas bad");
        // Every single-byte change past the metas either still reads or is refused.
        for at in (3 * PAGE_SIZE..db.len()).step_by(97) {
            let mut d = db.clone();
            d[at] ^= 0x5a;
            let _ = read::read_db(&d);
        }
    }
}
