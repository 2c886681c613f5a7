//! The latency floor of a durable single-client write on this machine: one `fdatasync` of a
//! small append plus one loopback TCP round trip. No server can answer a durable put faster
//! than that, so the 1-client put's p50 is judged against it (#6: within 1.2x).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use hdrhistogram::Histogram;

/// What one append costs a WAL: about the size of an encoded 1-put raft entry.
const APPEND: usize = 320;
/// Samples per measurement.
const SAMPLES: u64 = 2_000;
/// The file written ahead of the appends (so an fsync need not update its size or
/// allocate), as Cairn's WAL and etcd's preallocated WAL segments do.
const FILE: u64 = 8 << 20;

pub struct Floor {
    pub fsync_p50: Duration,
    pub fsync_p99: Duration,
    pub rtt_p50: Duration,
    pub rtt_p99: Duration,
}

impl Floor {
    /// The sum of the two medians.
    pub fn floor(&self) -> Duration {
        self.fsync_p50 + self.rtt_p50
    }

    pub fn describe(&self) -> String {
        format!(
            "fdatasync of a {APPEND}-byte append (file written ahead): p50 {} p99 {}; \
             loopback TCP round trip: p50 {} p99 {}; floor (sum of p50s) {:.3} ms, 1.2x = {:.3} ms",
            us(self.fsync_p50),
            us(self.fsync_p99),
            us(self.rtt_p50),
            us(self.rtt_p99),
            ms(self.floor()),
            ms(self.floor().mul_f64(1.2)),
        )
    }
}

fn us(d: Duration) -> String {
    format!("{} µs", d.as_micros())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Measures both, one after the other, in a fresh file under `dir` (the file system the
/// servers' data dirs are on).
pub fn measure(dir: &Path) -> Result<Floor> {
    let (fsync_p50, fsync_p99) = fsync(dir)?;
    let (rtt_p50, rtt_p99) = round_trip()?;
    Ok(Floor {
        fsync_p50,
        fsync_p99,
        rtt_p50,
        rtt_p99,
    })
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

fn quantiles(h: &Histogram<u64>) -> (Duration, Duration) {
    (
        Duration::from_nanos(h.value_at_quantile(0.5)),
        Duration::from_nanos(h.value_at_quantile(0.99)),
    )
}

fn fsync(dir: &Path) -> Result<(Duration, Duration)> {
    let tmp = tempfile::Builder::new()
        .prefix("cairn-bench-floor")
        .tempfile_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    let f = tmp.as_file();
    let zeros = vec![0u8; 1 << 20];
    for i in 0..FILE / zeros.len() as u64 {
        f.write_all_at(&zeros, i * zeros.len() as u64)?;
    }
    f.sync_all()?;
    let record = vec![0xa5u8; APPEND];
    let mut h = histogram();
    let mut at = 0;
    for _ in 0..SAMPLES {
        let t = Instant::now();
        f.write_all_at(&record, at)?;
        f.sync_data()?;
        h.record(t.elapsed().as_nanos() as u64)?;
        at = (at + APPEND as u64) % (FILE - APPEND as u64);
    }
    Ok(quantiles(&h))
}

/// A 64-byte ping and pong between two threads over a loopback connection (TCP_NODELAY).
fn round_trip() -> Result<(Duration, Duration)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 64];
        for _ in 0..SAMPLES {
            s.read_exact(&mut buf)?;
            s.write_all(&buf)?;
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [7u8; 64];
    let mut h = histogram();
    for _ in 0..SAMPLES {
        let t = Instant::now();
        s.write_all(&buf)?;
        s.read_exact(&mut buf)?;
        h.record(t.elapsed().as_nanos() as u64)?;
    }
    echo.join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    Ok(quantiles(&h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_the_sum_of_the_medians() {
        let f = Floor {
            fsync_p50: Duration::from_micros(120),
            fsync_p99: Duration::from_micros(300),
            rtt_p50: Duration::from_micros(60),
            rtt_p99: Duration::from_micros(90),
        };
        assert_eq!(f.floor(), Duration::from_micros(180));
        let d = f.describe();
        assert!(
            d.contains("floor (sum of p50s) 0.180 ms, 1.2x = 0.216 ms"),
            "{d}"
        );
    }

    #[test]
    fn both_measurements_run_here() {
        let dir = tempfile::tempdir().unwrap();
        let f = measure(dir.path()).unwrap();
        assert!(f.fsync_p50 > Duration::ZERO && f.fsync_p50 <= f.fsync_p99);
        assert!(f.rtt_p50 > Duration::ZERO && f.rtt_p50 <= f.rtt_p99);
        // The file is gone with its temp dir's other content.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
