//! A small mutation fuzzer on stable Rust: every target is a function of one byte string.
//!
//! Each run replays the target's regression inputs (`tests/integration/fuzz/regressions/<target>/`) and
//! its seeds unchanged, then feeds it mutations of the seeds (bit flips, interesting values,
//! inserted/deleted/duplicated ranges, splices of two seeds, dictionary tokens, stacked up to
//! eight deep) and a share of plain random bytes. A panic stops the run: the input is written
//! to `target/fuzz-crashes/<target>-<hash>.bin` (add it to the regressions once fixed) and
//! the test fails with its hex dump.
//!
//! `PLAZA_FUZZ_INPUTS` sets the number of inputs per target (default: each target's own
//! bounded count for `cargo nextest`), `PLAZA_FUZZ_SEED` the random seed (default: fixed per
//! target, so a run is repeatable), `PLAZA_FUZZ_REPORT` a file that gets one line per target
//! with the count, the time and the rate.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The project's seeded RNG (`rand`'s `StdRng`, as the core uses), with the few draws the
/// mutator needs.
#[derive(Debug, Clone)]
pub struct Rng(rand::rngs::StdRng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(rand::SeedableRng::seed_from_u64(seed))
    }
    pub fn next(&mut self) -> u64 {
        rand::Rng::random(&mut self.0)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        rand::Rng::random_range(&mut self.0, 0..n)
    }
    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// What one target is fed with.
pub struct Spec<'a> {
    /// Names the regression folder, the crash files and the report line.
    pub name: &'a str,
    /// Real inputs the mutations start from.
    pub seeds: Vec<Vec<u8>>,
    /// Tokens inserted or written over (JSON keys, SDP lines, interesting byte strings).
    pub dict: Vec<Vec<u8>>,
    /// Inputs under `cargo nextest` (without `PLAZA_FUZZ_INPUTS`).
    pub default_inputs: u64,
    /// Longest input generated.
    pub max_len: usize,
}

const INTERESTING_8: &[u8] = &[
    0, 1, 2, 0x0f, 0x10, 0x1f, 0x20, 0x3f, 0x40, 0x7f, 0x80, 0x81, 0xfe, 0xff,
];
const INTERESTING_16: &[u16] = &[
    0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0x3fff, 0x7fff, 0x8000, 0xfffe, 0xffff,
];
const INTERESTING_32: &[u32] = &[
    0,
    1,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x2112_a442,
    0x0001_0000,
];

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim().replace('_', "");
    let parsed = if let Some(hex) = v.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else {
        v.parse()
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v}: {e}")))
}

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The files of `tests/integration/fuzz/<dir>/<name>/`, sorted (none if the folder is missing).
pub fn files(dir: &str, name: &str) -> Vec<Vec<u8>> {
    let path = repo_path(&format!("tests/integration/fuzz/{dir}/{name}"));
    let Ok(rd) = std::fs::read_dir(&path) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}

/// Applies one random mutation to `buf`.
pub fn mutate_once(
    rng: &mut Rng,
    buf: &mut Vec<u8>,
    seeds: &[Vec<u8>],
    dict: &[Vec<u8>],
    max_len: usize,
) {
    let len = buf.len();
    match rng.below(14) {
        0 if len > 0 => {
            let i = rng.below(len);
            buf[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            buf[i] = rng.next() as u8;
        }
        2 if len > 0 => {
            let i = rng.below(len);
            buf[i] = *rng.pick(INTERESTING_8);
        }
        3 if len > 1 => {
            let i = rng.below(len - 1);
            let v = rng.pick(INTERESTING_16).to_be_bytes();
            buf[i..i + 2].copy_from_slice(&v);
        }
        4 if len > 3 => {
            let i = rng.below(len - 3);
            let v = rng.pick(INTERESTING_32).to_be_bytes();
            buf[i..i + 4].copy_from_slice(&v);
        }
        5 if len > 0 => {
            let i = rng.below(len);
            let d = (rng.below(33) as u8).wrapping_sub(16);
            buf[i] = buf[i].wrapping_add(d);
        }
        6 if len > 0 => {
            // delete a range
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(64));
            buf.drain(at..at + n);
        }
        7 => {
            // insert random bytes or a run of one byte
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let ins = if rng.one_in(2) {
                rng.bytes(n)
            } else {
                vec![rng.next() as u8; n]
            };
            buf.splice(at..at, ins);
        }
        8 if len > 0 => {
            // duplicate a range somewhere else
            let from = rng.below(len);
            let n = 1 + rng.below((len - from).min(128));
            let chunk = buf[from..from + n].to_vec();
            let at = rng.below(len + 1);
            buf.splice(at..at, chunk);
        }
        9 if len > 0 => buf.truncate(rng.below(len)),
        10 if !seeds.is_empty() => {
            // splice: a prefix of this input and a suffix of a seed
            let other = rng.pick(seeds);
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            buf.truncate(cut);
            buf.extend_from_slice(&other[from..]);
        }
        11 | 12 if !dict.is_empty() => {
            let tok = rng.pick(dict).clone();
            let at = rng.below(len + 1);
            if rng.one_in(2) || at == len {
                buf.splice(at..at, tok);
            } else {
                let end = (at + tok.len()).min(len);
                buf.splice(at..end, tok);
            }
        }
        13 if len > 1 => {
            // swap two bytes
            let (i, j) = (rng.below(len), rng.below(len));
            buf.swap(i, j);
        }
        _ => {
            let at = rng.below(len + 1);
            buf.insert(at, rng.next() as u8);
        }
    }
    buf.truncate(max_len);
}

/// One input: a seed (or, sometimes, random bytes) with 1–8 stacked mutations.
pub fn generate(rng: &mut Rng, spec: &Spec, out: &mut Vec<u8>) {
    out.clear();
    if spec.seeds.is_empty() || rng.one_in(16) {
        let n = rng.below(spec.max_len.min(512) + 1);
        out.extend(rng.bytes(n));
        return;
    }
    let i = rng.below(spec.seeds.len());
    out.extend_from_slice(&spec.seeds[i]);
    let depth = 1 << rng.below(4);
    for _ in 0..rng.below(depth) + 1 {
        mutate_once(rng, out, &spec.seeds, &spec.dict, spec.max_len);
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn report_crash(name: &str, input: &[u8], origin: &str) -> ! {
    let mut h = DefaultHasher::new();
    input.hash(&mut h);
    let dir = repo_path("target/fuzz-crashes");
    let path = dir.join(format!("{name}-{:016x}.bin", h.finish()));
    let saved = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, input))
        .map(|()| path.display().to_string())
        .unwrap_or_else(|e| format!("(not saved: {e})"));
    let shown = &input[..input.len().min(512)];
    panic!(
        "fuzz target `{name}` panicked on {origin} ({} bytes), saved to {saved}; \
         hex{}: {}",
        input.len(),
        if shown.len() < input.len() {
            " (first 512 bytes)"
        } else {
            ""
        },
        hex(shown)
    );
}

/// Runs `target` on the regressions, the seeds and then generated inputs; panics (failing the
/// test) on the first input the target panics on. Returns the number of inputs run.
pub fn run(spec: Spec, target: impl FnMut(&[u8])) -> u64 {
    run_scaled(spec, 1, target)
}

/// [`run`] for a slow target: `PLAZA_FUZZ_INPUTS / scale` inputs (at least one).
pub fn run_scaled(spec: Spec, scale: u64, mut target: impl FnMut(&[u8])) -> u64 {
    let inputs = env_u64("PLAZA_FUZZ_INPUTS").map_or(spec.default_inputs, |n| (n / scale).max(1));
    let mut h = DefaultHasher::new();
    spec.name.hash(&mut h);
    let given = env_u64("PLAZA_FUZZ_SEED");
    let seed = given.map_or(h.finish(), |s| s ^ h.finish());
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    let mut count = 0u64;
    let mut call = |input: &[u8], origin: &str, count: &mut u64| {
        *count += 1;
        if catch_unwind(AssertUnwindSafe(|| target(input))).is_err() {
            report_crash(spec.name, input, origin);
        }
    };
    for (i, r) in files("regressions", spec.name).iter().enumerate() {
        call(r, &format!("regression #{i}"), &mut count);
    }
    for (i, s) in spec.seeds.iter().enumerate() {
        call(s, &format!("seed #{i}"), &mut count);
    }
    let mut buf = Vec::with_capacity(spec.max_len);
    while count < inputs {
        generate(&mut rng, &spec, &mut buf);
        call(&buf, "a generated input", &mut count);
    }
    let secs = start.elapsed().as_secs_f64();
    let line = format!(
        "fuzz {:<10} {:>10} inputs {:>8.2} s {:>10.0} inputs/s  PLAZA_FUZZ_SEED={}",
        spec.name,
        count,
        secs,
        count as f64 / secs.max(1e-9),
        given.map_or("(unset)".to_owned(), |g| g.to_string())
    );
    println!("{line}");
    if let Ok(path) = std::env::var("PLAZA_FUZZ_REPORT") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        writeln!(f, "{line}").unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    count
}

/// Bytes as text the way a text frame or SDP would arrive: valid UTF-8 as it is, anything
/// else with replacement characters (still text the parser has to survive).
pub fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// A byte-driven reader for structured targets (the whole core): each decision takes bytes
/// from the input; when the input runs out it reads zeros.
pub struct Unstructured<'a> {
    data: &'a [u8],
}

impl<'a> Unstructured<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Unstructured { data }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn below(&mut self, n: usize) -> usize {
        usize::from(self.u8()) % n
    }
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    /// A length-prefixed (one byte) slice, as far as the input goes.
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u8()).min(max).min(self.data.len());
        let (b, rest) = self.data.split_at(n);
        self.data = rest;
        b
    }
    /// A slice of `n` bytes, or fewer when the input runs out (two-byte length prefix).
    pub fn bytes_long(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u16()).min(max).min(self.data.len());
        let (b, rest) = self.data.split_at(n);
        self.data = rest;
        b
    }
}
