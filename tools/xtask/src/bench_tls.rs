//! `cargo xtask bench tls`: HTTPS serving against nginx (`ssl`, `sendfile on`, and kTLS
//! through `ssl_conf_command Options KTLS` where the kernel has it) with the same ECDSA P-256
//! certificate and the same pinning as `bench serve` (load on core 0, server on core 1), page
//! cache hot:
//! - `range_1m`: 1 MiB ranges at 64 connections, `range_64k`: 64 KiB ranges at 1000 (wrk over
//!   TLS: throughput, p99, the server's CPU per GB);
//! - `handshake_full` and `handshake_resumed`: new connections per second, each fetching a
//!   1 KiB file (`openssl s_time -new` and `-reuse`, four clients on core 0; the server's CPU
//!   per handshake).
//!
//! The servers alternate round after round; the figures are medians. Which TLS path each
//! side used (kernel or user space) is read from the kernel's TLS counters during its runs.

use crate::bench::{env_u64, median_of, round_to};
use crate::bench_host::{cpu_ticks, ensure_tools, ticks_per_s, wait_quiet};
use crate::bench_serve::{
    file_name, generate_catalog, range_script, run_wrk, url_path, Load, Run, FILE_BYTES,
};
use crate::bench_servers::{start_appliance, start_nginx, ApplianceSetup, NginxFlavor, Server};
use crate::util::workspace_root;
use anyhow::{bail, Context, Result};
use appliance_testkit::tls::{self_signed, Validity};
use appliance_testkit::{Fill, Guard, SplitMix64};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The small file every handshake connection fetches.
const SMALL_PATH: &str = "/bench/small-1k.bin";
const SMALL_BYTES: u64 = 1024;
/// The certificate's name (clients connect by address: no SNI, the default certificate).
const NAME: &str = "bench.example";
/// Parallel `openssl s_time` clients in a handshake case.
const HANDSHAKE_CLIENTS: usize = 4;

/// The wrk cases: name, range length, connections.
const RANGE_CASES: [(&str, u64, u64); 2] = [("range_1m", MIB, 64), ("range_64k", 64 << 10, 1000)];
/// The handshake cases: name and `s_time`'s flag.
const HANDSHAKE_CASES: [(&str, &str); 2] =
    [("handshake_full", "-new"), ("handshake_resumed", "-reuse")];

/// What one handshake run measured.
#[derive(Clone, Debug, Default)]
struct Handshakes {
    per_s: f64,
    /// The server's CPU per connection, in milliseconds.
    cpu_ms_each: f64,
    /// Share of connections that resumed a session (s_time's `r` marks).
    resumed_share: f64,
}

pub fn tls() -> Result<Map<String, Value>> {
    ensure_tools(
        "tls",
        &[
            ("wrk", "wrk"),
            ("nginx", "nginx"),
            ("openssl", "openssl"),
            ("taskset", "util-linux"),
        ],
    )?;
    let rounds = env_u64("BENCH_ROUNDS", 3).max(1);
    let seconds = env_u64("BENCH_SECONDS", 8).max(1);
    let files = env_u64("BENCH_TLS_FILES", 32).max(1);
    let pin = std::thread::available_parallelism().map_or(1, usize::from) >= 2;
    let applianced = crate::bench_servers::applianced_under_test()?;
    let dir = workspace_root().join("target/bench/tls");
    std::fs::create_dir_all(&dir)?;
    let catalog = dir.join("catalog");
    generate_catalog(&catalog, files)?;
    let small = catalog.join(SMALL_PATH.trim_start_matches('/'));
    appliance_testkit::write_seeded_file(&small, 7, SMALL_BYTES)?;
    let certificate = self_signed(&dir, "bench", &[NAME], Validity::Current)?;
    let ticks_per_s = ticks_per_s()?;
    let appliance = start_appliance(&ApplianceSetup {
        binary: &applianced,
        dir: &dir,
        catalog: &catalog,
        drive_bytes: files * FILE_BYTES + (4 << 30),
        fill: Fill::default(),
        pin,
        cgroup: None,
        tls: Some(&certificate),
    })?;
    let nginx = start_nginx(
        &dir,
        &catalog,
        NginxFlavor::Sendfile,
        pin,
        None,
        Some(&certificate),
    )?;
    let servers = [&appliance, &nginx];
    for server in servers {
        verify_https(server, &catalog, &certificate.cert, files)?;
        warm(server, files)?;
    }
    println!("  both servers return byte-exact ranges over HTTPS");

    let mut ranges: BTreeMap<(&str, &str), Vec<Run>> = BTreeMap::new();
    let mut handshakes: BTreeMap<(&str, &str), Vec<Handshakes>> = BTreeMap::new();
    let mut kernel_records: BTreeMap<&str, f64> = BTreeMap::new();
    let mut waited = Duration::ZERO;
    let mut notes = Vec::new();
    for round in 0..rounds {
        let first = usize::try_from(round % 2)?;
        for (number, (name, range_bytes, connections)) in RANGE_CASES.iter().enumerate() {
            let script = dir.join(format!("{name}.lua"));
            range_script(
                &script,
                name,
                files,
                *range_bytes,
                round * 10 + u64::try_from(number)? + 1,
            )?;
            for at in 0..servers.len() {
                let server = servers[(first + at) % servers.len()];
                wait_quiet(ticks_per_s, &mut waited)?;
                let records = kernel_tls_records()?;
                let run = run_wrk(&Load {
                    server,
                    url: format!("https://127.0.0.1:{}/", tls_port(server)?),
                    connections: *connections,
                    seconds,
                    script: &script,
                    pin,
                    ticks_per_s,
                })?;
                *kernel_records.entry(server.name).or_default() += kernel_tls_records()? - records;
                println!(
                    "  round {round} {name:<18} {:<9} {:6.2} GB/s {:8.0} req/s p99 {:7.2} ms \
                     cpu {:5.3} s/GB errors {}",
                    server.name, run.gbps, run.rps, run.p99_ms, run.cpu_s_per_gb, run.errors
                );
                if run.errors > 0.0 {
                    notes.push(format!(
                        "round {round} {name} {}: {} errors",
                        server.name, run.errors
                    ));
                }
                ranges.entry((name, server.name)).or_default().push(run);
            }
        }
        for (name, flag) in HANDSHAKE_CASES {
            for at in 0..servers.len() {
                let server = servers[(first + at) % servers.len()];
                wait_quiet(ticks_per_s, &mut waited)?;
                let run = s_time(server, flag, seconds, pin, ticks_per_s)?;
                println!(
                    "  round {round} {name:<18} {:<9} {:8.0} handshakes/s cpu {:6.3} ms each, \
                     {:.0}% resumed",
                    server.name,
                    run.per_s,
                    run.cpu_ms_each,
                    run.resumed_share * 100.0
                );
                if flag == "-reuse" && run.resumed_share < 0.9 {
                    notes.push(format!(
                        "round {round} {name} {}: only {:.0}% of connections resumed",
                        server.name,
                        run.resumed_share * 100.0
                    ));
                }
                handshakes.entry((name, server.name)).or_default().push(run);
            }
        }
    }
    let appliance_kernel = appliance
        .metrics()?
        .get("appliance_tls_kernel")
        .copied()
        .unwrap_or(0.0);
    drop(nginx);
    drop(appliance);
    let _ = std::fs::remove_file(dir.join("drive0.img"));

    let mut figures = Map::new();
    let path_of = |name: &str| {
        if kernel_records.get(name).copied().unwrap_or(0.0) > 0.0 {
            "kernel"
        } else {
            "user"
        }
    };
    figures.insert(
        "appliance_tls_path".into(),
        json!(if appliance_kernel > 0.0 {
            "kernel"
        } else {
            "user"
        }),
    );
    figures.insert("nginx_tls_path".into(), json!(path_of("nginx")));
    figures.insert(
        "kernel_tls_module".into(),
        json!(Path::new("/proc/net/tls_stat").exists()),
    );
    println!(
        "== tls: medians of {rounds} rounds of {seconds} s, {files} files of 16 MiB, page cache \
         hot, load on core 0, server on core 1 =="
    );
    println!(
        "  {:<18} {:>22} {:>22} {:>7} {:>9}",
        "case", "appliance", "nginx", "ratio", "cpu ratio"
    );
    for (name, _, _) in RANGE_CASES {
        summarize(
            &mut figures,
            name,
            &ranges[&(name, "appliance")],
            &ranges[&(name, "nginx")],
            &Summary {
                fields: &[
                    ("gbps", |run| run.gbps, 3),
                    ("rps", |run| run.rps, 0),
                    ("p99_ms", |run| run.p99_ms, 2),
                    ("cpu_s_per_gb", |run| run.cpu_s_per_gb, 3),
                ],
                throughput: |run| run.gbps,
                cpu: |run| run.cpu_s_per_gb,
                cell: |list| {
                    format!(
                        "{:.2} GB/s {:.0} ms {:.3} s/GB",
                        median_of(list, |run| run.gbps),
                        median_of(list, |run| run.p99_ms),
                        median_of(list, |run| run.cpu_s_per_gb)
                    )
                },
            },
        );
    }
    for (name, _) in HANDSHAKE_CASES {
        summarize(
            &mut figures,
            name,
            &handshakes[&(name, "appliance")],
            &handshakes[&(name, "nginx")],
            &Summary {
                fields: &[
                    ("per_s", |run| run.per_s, 0),
                    ("cpu_ms_each", |run| run.cpu_ms_each, 4),
                    ("resumed_share", |run| run.resumed_share, 3),
                ],
                throughput: |run| run.per_s,
                cpu: |run| run.cpu_ms_each,
                cell: |list| {
                    format!(
                        "{:.0}/s {:.3} ms",
                        median_of(list, |run| run.per_s),
                        median_of(list, |run| run.cpu_ms_each)
                    )
                },
            },
        );
    }
    println!(
        "  TLS path: appliance {}, nginx {}; ratio: ours over nginx; cpu ratio: nginx's CPU \
         per GB (per handshake) over ours",
        figures["appliance_tls_path"], figures["nginx_tls_path"]
    );
    if notes.is_empty() {
        println!("  no errors");
    } else {
        for note in &notes {
            println!("  problem: {note}");
        }
    }
    figures.insert("rounds".into(), json!(rounds));
    figures.insert("seconds_per_run".into(), json!(seconds));
    figures.insert("files".into(), json!(files));
    figures.insert("handshake_clients".into(), json!(HANDSHAKE_CLIENTS));
    figures.insert("problems".into(), json!(notes));
    Ok(figures)
}

/// A figure kept per server: its JSON key suffix, its value in one run, its decimals.
type Field<T> = (&'static str, fn(&T) -> f64, i32);

/// How a case's runs are summarised: the figures kept per server (JSON key suffix, the value
/// of a run, decimals), what the ratios compare, and the table cell of one server.
struct Summary<T: 'static> {
    fields: &'static [Field<T>],
    throughput: fn(&T) -> f64,
    cpu: fn(&T) -> f64,
    cell: fn(&[T]) -> String,
}

/// Records a case's medians for both servers, `<case>_ratio` (our throughput over nginx's)
/// and `<case>_cpu_ratio` (nginx's CPU over ours), and prints its table line.
fn summarize<T>(
    figures: &mut Map<String, Value>,
    name: &str,
    ours: &[T],
    theirs: &[T],
    summary: &Summary<T>,
) {
    for (server, list) in [("appliance", ours), ("nginx", theirs)] {
        for (key, field, places) in summary.fields {
            figures.insert(
                format!("{name}_{server}_{key}"),
                json!(round_to(median_of(list, field), *places)),
            );
        }
    }
    let ratio = median_of(ours, summary.throughput) / median_of(theirs, summary.throughput);
    let cpu_ratio = median_of(theirs, summary.cpu) / median_of(ours, summary.cpu);
    figures.insert(format!("{name}_ratio"), json!(round_to(ratio, 3)));
    figures.insert(format!("{name}_cpu_ratio"), json!(round_to(cpu_ratio, 3)));
    println!(
        "  {name:<18} {:>22} {:>22} {ratio:>7.3} {cpu_ratio:>9.3}",
        (summary.cell)(ours),
        (summary.cell)(theirs)
    );
}

fn tls_port(server: &Server) -> Result<u16> {
    server
        .tls_port
        .with_context(|| format!("{} has no HTTPS listener", server.name))
}

/// Records the kernel has encrypted (TlsTxSw + TlsTxDevice of /proc/net/tls_stat); 0 when
/// the kernel has no TLS.
fn kernel_tls_records() -> Result<f64> {
    let Ok(text) = std::fs::read_to_string("/proc/net/tls_stat") else {
        return Ok(0.0);
    };
    Ok(text
        .lines()
        .filter_map(|line| line.split_once(char::is_whitespace))
        .filter(|(name, _)| *name == "TlsTxSw" || *name == "TlsTxDevice")
        .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
        .sum())
}

/// curl over HTTPS trusting only the bench certificate: a few ranges and the small file,
/// compared with the source files.
fn verify_https(server: &Server, catalog: &Path, ca: &Path, files: u64) -> Result<()> {
    let port = tls_port(server)?;
    let resolve = format!("{NAME}:{port}:127.0.0.1");
    let mut rng = SplitMix64(0x5eed_7115);
    let mut checks: Vec<(String, Option<(u64, u64)>)> = vec![(SMALL_PATH.to_string(), None)];
    for length in [1, 65536, MIB, 3 * MIB + 17] {
        let first = rng.below(FILE_BYTES - length + 1);
        checks.push((
            url_path(rng.below(files)),
            Some((first, first + length - 1)),
        ));
    }
    for (path, range) in checks {
        let mut command = Command::new("curl");
        command.args(["-sf", "--max-time", "30", "--resolve", &resolve, "--cacert"]);
        command.arg(ca);
        if let Some((first, last)) = range {
            command.args(["-r", &format!("{first}-{last}")]);
        }
        let out = command
            .arg(format!("https://{NAME}:{port}{path}"))
            .output()
            .context("running curl")?;
        if !out.status.success() {
            bail!(
                "{}: curl https {path} {range:?} failed: {}",
                server.name,
                out.status
            );
        }
        let source = std::fs::read(catalog.join(path.trim_start_matches('/')))?;
        let want = match range {
            Some((first, last)) => &source[usize::try_from(first)?..=usize::try_from(last)?],
            None => &source[..],
        };
        if out.stdout != want {
            bail!(
                "{}: https {path} {range:?}: the body differs from the source",
                server.name
            );
        }
    }
    Ok(())
}

/// Reads every file once through the server (plain HTTP), so the cases run hot.
fn warm(server: &Server, files: u64) -> Result<()> {
    for number in 0..files {
        let path = format!("/bench/{}", file_name(number));
        let response = appliance_testkit::get(server.port, &path, None)?;
        if response.status != 200 {
            bail!(
                "{}: warming {path} answered {}",
                server.name,
                response.status
            );
        }
    }
    Ok(())
}

/// `HANDSHAKE_CLIENTS` runs of `openssl s_time` side by side (on core 0 when pinned), each
/// making new connections (`-new`: full handshakes; `-reuse`: resumed) that fetch the small
/// file, for `seconds`.
fn s_time(
    server: &Server,
    flag: &str,
    seconds: u64,
    pin: bool,
    ticks_per_s: f64,
) -> Result<Handshakes> {
    let port = tls_port(server)?;
    let connect = format!("127.0.0.1:{port}");
    let time = seconds.to_string();
    let before = cpu_ticks(server.cpu_pid)?;
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..HANDSHAKE_CLIENTS {
        let mut command = if pin {
            let mut command = Command::new("taskset");
            command.args(["-c", "0", "openssl"]);
            command
        } else {
            Command::new("openssl")
        };
        command
            .args([
                "s_time", "-connect", &connect, flag, "-time", &time, "-www", SMALL_PATH,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        clients.push(Guard::new(
            "openssl s_time",
            command.spawn().context("starting openssl s_time")?,
        ));
    }
    let mut connections = 0.0;
    let mut resumed = 0.0;
    let mut marks = 0.0;
    for mut client in clients {
        let mut text = String::new();
        if let Some(mut stdout) = client.child().stdout.take() {
            stdout.read_to_string(&mut text)?;
        }
        client.child().wait()?;
        for line in text.lines() {
            if let Some((count, rest)) = line.split_once(" connections in ") {
                if rest.contains("real seconds") {
                    connections += count.trim().parse::<f64>().unwrap_or(0.0);
                }
            } else if line.chars().all(|mark| mark == '*' || mark == 'r') {
                resumed += line.chars().filter(|mark| *mark == 'r').count() as f64;
                marks += line.len() as f64;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_s = (cpu_ticks(server.cpu_pid)? - before) / ticks_per_s;
    if connections == 0.0 {
        bail!("openssl s_time made no connection to {}", server.name);
    }
    Ok(Handshakes {
        per_s: connections / elapsed,
        cpu_ms_each: cpu_s * 1000.0 / connections,
        resumed_share: if marks > 0.0 { resumed / marks } else { 0.0 },
    })
}
