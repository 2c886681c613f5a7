//! A reader for bbolt database files: every top-level bucket with its keys and values.
//!
//! It follows the newest meta page whose checksum holds (bbolt writes the two meta pages in
//! turn, so a torn write leaves the other one valid), then walks the root bucket's B+tree and
//! each bucket's tree: branch pages, leaf pages with their overflow pages, and inline buckets
//! (a small bucket stored as a page inside its header value). Everything is bounds-checked, so
//! a truncated or corrupt file gives an error, never a panic. Nested buckets are not part of
//! etcd's layout and are refused.

use std::collections::BTreeMap;

use crate::{
    fnv64a, Bucket, BRANCH_FLAG, BUCKET_LEAF_FLAG, ELEMENT, LEAF_FLAG, MAGIC, META_CHECKSUM_AT,
    PAGE_HEADER, VERSION,
};

/// Why a file could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadError(pub String);

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bbolt: {}", self.0)
    }
}

impl std::error::Error for ReadError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ReadError> {
    Err(ReadError(msg.into()))
}

fn bytes(b: &[u8], at: usize, len: usize) -> Result<&[u8], ReadError> {
    at.checked_add(len)
        .and_then(|end| b.get(at..end))
        .map_or_else(|| err(format!("truncated at byte {at} (+{len})")), Ok)
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, ReadError> {
    Ok(u16::from_le_bytes(
        bytes(b, at, 2)?.try_into().expect("2 bytes"),
    ))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, ReadError> {
    Ok(u32::from_le_bytes(
        bytes(b, at, 4)?.try_into().expect("4 bytes"),
    ))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, ReadError> {
    Ok(u64::from_le_bytes(
        bytes(b, at, 8)?.try_into().expect("8 bytes"),
    ))
}

/// Deepest tree the reader follows (bbolt trees are a handful of levels; this stops cycles).
const MAX_DEPTH: usize = 64;

struct File<'a> {
    data: &'a [u8],
    page_size: usize,
    /// Pages at or above the high-water mark are not part of the database.
    high_water: u64,
}

/// A valid meta page: (txid, root page, high-water mark, page size).
fn meta(data: &[u8], offset: usize) -> Result<(u64, u64, u64, usize), ReadError> {
    let m = bytes(data, offset + PAGE_HEADER, META_CHECKSUM_AT + 8)?;
    if u32_at(m, 0)? != MAGIC {
        return err("not a bbolt file (bad magic)");
    }
    if u32_at(m, 4)? != VERSION {
        return err(format!("unsupported bbolt version {}", u32_at(m, 4)?));
    }
    if u64_at(m, META_CHECKSUM_AT)? != fnv64a(&m[..META_CHECKSUM_AT]) {
        return err("meta page checksum mismatch");
    }
    let page_size = u32_at(m, 8)? as usize;
    if !(512..=1 << 20).contains(&page_size) || !page_size.is_power_of_two() {
        return err(format!("implausible page size {page_size}"));
    }
    Ok((u64_at(m, 48)?, u64_at(m, 16)?, u64_at(m, 40)?, page_size))
}

impl<'a> File<'a> {
    /// Page `id` with its overflow pages.
    fn page(&self, id: u64) -> Result<&'a [u8], ReadError> {
        if id < 2 || id >= self.high_water {
            return err(format!("page {id} outside the database"));
        }
        let start = (id as usize)
            .checked_mul(self.page_size)
            .map_or_else(|| err("page offset overflows"), Ok)?;
        let head = bytes(self.data, start, PAGE_HEADER)?;
        if u64_at(head, 0)? != id {
            return err(format!("page {id} carries id {}", u64_at(head, 0)?));
        }
        let overflow = u64::from(u32_at(head, 12)?);
        if id + overflow >= self.high_water {
            return err(format!("page {id} overflows past the high-water mark"));
        }
        bytes(self.data, start, (overflow as usize + 1) * self.page_size)
    }

    /// Every (key, value, is-bucket) of the tree rooted at page `root`, in order.
    fn tree(
        &self,
        root: u64,
        depth: usize,
        out: &mut Vec<(Vec<u8>, Vec<u8>, bool)>,
    ) -> Result<(), ReadError> {
        if depth > MAX_DEPTH {
            return err("tree deeper than any bbolt tree (a cycle?)");
        }
        let p = self.page(root)?;
        self.node(p, depth, out)
    }

    /// The entries of one node: a leaf's own, or those of a branch's children.
    fn node(
        &self,
        p: &[u8],
        depth: usize,
        out: &mut Vec<(Vec<u8>, Vec<u8>, bool)>,
    ) -> Result<(), ReadError> {
        let flags = u16_at(p, 8)?;
        let count = usize::from(u16_at(p, 10)?);
        for i in 0..count {
            let e = PAGE_HEADER + i * ELEMENT;
            if flags & LEAF_FLAG != 0 {
                let (f, pos, ks, vs) = (
                    u32_at(p, e)?,
                    u32_at(p, e + 4)? as usize,
                    u32_at(p, e + 8)? as usize,
                    u32_at(p, e + 12)? as usize,
                );
                let k = bytes(p, e + pos, ks)?.to_vec();
                let v = bytes(p, e + pos + ks, vs)?.to_vec();
                out.push((k, v, f & BUCKET_LEAF_FLAG != 0));
            } else if flags & BRANCH_FLAG != 0 {
                let child = u64_at(p, e + 8)?;
                self.tree(child, depth + 1, out)?;
            } else {
                return err(format!("page of kind {flags:#x} inside a tree"));
            }
        }
        Ok(())
    }

    /// The entries of a bucket from its header value: a tree, or an inline page.
    fn bucket(&self, name: &[u8], header: &[u8]) -> Result<Bucket, ReadError> {
        let root = u64_at(header, 0)?;
        let mut entries = Vec::new();
        if root == 0 {
            // Inline: the page follows the 16-byte header.
            let page = bytes(header, 16, header.len().saturating_sub(16))?;
            self.node(page, 0, &mut entries)?;
        } else {
            self.tree(root, 0, &mut entries)?;
        }
        let mut out = Bucket::new();
        for (k, v, is_bucket) in entries {
            if is_bucket {
                return err(format!(
                    "nested bucket {:?} in {:?}",
                    String::from_utf8_lossy(&k),
                    String::from_utf8_lossy(name)
                ));
            }
            out.insert(k, v);
        }
        Ok(out)
    }
}

/// Every top-level bucket of the bbolt file `data`.
pub fn read_db(data: &[u8]) -> Result<BTreeMap<Vec<u8>, Bucket>, ReadError> {
    // Meta page 0 tells the page size; meta page 1 sits one page later.
    let first = meta(data, 0);
    let size = match &first {
        Ok(m) => m.3,
        Err(_) => crate::PAGE_SIZE,
    };
    let second = meta(data, size);
    let (txid, root, high_water, page_size) = match (first, second) {
        (Ok(a), Ok(b)) => {
            if b.0 > a.0 {
                b
            } else {
                a
            }
        }
        (Ok(a), Err(_)) | (Err(_), Ok(a)) => a,
        (Err(e), Err(_)) => return Err(e),
    };
    let _ = txid;
    let file = File {
        data,
        page_size,
        high_water,
    };
    if (high_water as usize).saturating_mul(page_size) > data.len() {
        return err(format!(
            "file holds {} bytes, its meta page needs {}",
            data.len(),
            high_water as usize * page_size
        ));
    }
    let mut top = Vec::new();
    file.tree(root, 0, &mut top)?;
    let mut out = BTreeMap::new();
    for (name, header, is_bucket) in top {
        if !is_bucket {
            return err(format!(
                "key {:?} outside any bucket",
                String::from_utf8_lossy(&name)
            ));
        }
        let b = file.bucket(&name, &header)?;
        out.insert(name, b);
    }
    Ok(out)
}
