//! CPU affinity for the benchmark: the server under test and the load generator on separate
//! cores.
//!
//! On a small machine the load generator's threads share the cores with the server. Every
//! datagram the server sends on loopback is delivered inside the server's own `sendmmsg` and
//! wakes a load-generator thread; when that thread is woken on the server's core the scheduler
//! may run it first, and the server's send call returns milliseconds later. That wait is the
//! benchmark disturbing itself, not the server's latency (a real SFU's receivers are on other
//! machines). Pinning the server to its own core(s) and the generator to the others removes it.

use anyhow::{Context, Result, bail};
use std::process::Command;

/// Parses a CPU list such as `0`, `1-3` or `0,2-3`.
pub fn parse_cpus(s: &str) -> Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (
                    a.trim()
                        .parse()
                        .with_context(|| format!("CPU list {s:?}"))?,
                    b.trim()
                        .parse()
                        .with_context(|| format!("CPU list {s:?}"))?,
                );
                if a > b {
                    bail!("CPU list {s:?}: range {a}-{b} is backwards");
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().with_context(|| format!("CPU list {s:?}"))?),
        }
    }
    if cpus.is_empty() {
        bail!("CPU list {s:?} is empty");
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Formats a CPU list back (`0,2-3` style).
pub fn format_cpus(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

/// CPUs online on the machine (not only those this process may use).
#[allow(unsafe_code)] // sysconf(3); see the SAFETY comment
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // sched_setaffinity(2); see the SAFETY comment
fn set_affinity(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET only writes inside it (indices
    // are bounded below), and sched_setaffinity reads `size_of::<cpu_set_t>()` bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn set_affinity(_cpus: &[usize]) -> std::io::Result<()> {
    Err(std::io::Error::other(
        "CPU affinity is only supported on Linux",
    ))
}

/// Restricts the calling thread (and every thread it starts afterwards) to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> Result<()> {
    set_affinity(cpus).with_context(|| format!("pinning to CPUs {}", format_cpus(cpus)))
}

/// Makes `cmd`'s process start restricted to `cpus`.
#[allow(unsafe_code)] // pre_exec runs between fork and exec; see the SAFETY comment
pub fn pin_command(cmd: &mut Command, cpus: &[usize]) {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let cpus = cpus.to_vec();
        // SAFETY: the closure runs in the child between fork and exec and only makes one
        // system call (no allocation: `cpus` was moved in before the fork).
        unsafe {
            cmd.pre_exec(move || set_affinity(&cpus));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_and_format() {
        assert_eq!(parse_cpus("0").unwrap(), vec![0]);
        assert_eq!(parse_cpus("1-3").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_cpus("3,0,2-3").unwrap(), vec![0, 2, 3]);
        assert_eq!(format_cpus(&[0, 2, 3]), "0,2-3");
        assert_eq!(format_cpus(&[1]), "1");
        assert!(parse_cpus("").is_err());
        assert!(parse_cpus("3-1").is_err());
        assert!(parse_cpus("x").is_err());
    }
}
