//! A fault-injecting test origin of our own (500s, bodies cut short, wrong bytes, stalls, 200
//! where 206 was asked, missing files, redirects, endless bodies) on loopback, stopped when
//! dropped; and catalogs written where nginx (`appliance_testkit::Nginx`) serves them.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the fault origin does to requests for one path.
#[derive(Clone, Debug)]
pub enum Fault {
    /// The first `times` requests get 500.
    ServerError { times: u64 },
    /// The first `times` responses announce the whole length but close after `bytes`.
    CutAfter { bytes: usize, times: u64 },
    /// Every response carries one flipped byte.
    WrongBytes,
    /// The first `times` responses send `bytes` and then go silent for `pause`.
    Stall {
        bytes: usize,
        pause: Duration,
        times: u64,
    },
    /// The first response is cut after `bytes`; later ones ignore Range (200, whole body).
    CutThenIgnoreRange { bytes: usize },
    /// 404.
    Missing,
    /// 302 to `location`.
    Redirect { location: String },
    /// 200 without a length, then zeros until the client goes away (`/dev/zero` over HTTP).
    Endless,
}

/// A small HTTP/1.1 origin with per-path faults; counts requests per path.
pub struct FaultOrigin {
    pub port: u16,
    stop: Arc<AtomicBool>,
    pub requests: Arc<Mutex<HashMap<String, u64>>>,
    pub bytes_sent: Arc<AtomicU64>,
}

type Files = Arc<Mutex<HashMap<String, Vec<u8>>>>;

impl FaultOrigin {
    pub fn start(files: HashMap<String, Vec<u8>>, faults: HashMap<String, Fault>) -> FaultOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(HashMap::new()));
        let bytes_sent = Arc::new(AtomicU64::new(0));
        let files: Files = Arc::new(Mutex::new(files));
        let faults = Arc::new(Mutex::new(faults));
        let (stop_flag, counts, sent) = (
            Arc::clone(&stop),
            Arc::clone(&requests),
            Arc::clone(&bytes_sent),
        );
        std::thread::spawn(move || {
            while !stop_flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (files, faults, counts, sent) = (
                            Arc::clone(&files),
                            Arc::clone(&faults),
                            Arc::clone(&counts),
                            Arc::clone(&sent),
                        );
                        std::thread::spawn(move || serve(stream, &files, &faults, &counts, &sent));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FaultOrigin {
            port,
            stop,
            requests,
            bytes_sent,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests_for(&self, path: &str) -> u64 {
        self.requests
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for FaultOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(
    stream: TcpStream,
    files: &Files,
    faults: &Mutex<HashMap<String, Fault>>,
    counts: &Mutex<HashMap<String, u64>>,
    sent: &AtomicU64,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut range_start: Option<usize> = None;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(value) = lower.strip_prefix("range: bytes=") {
                range_start = value.trim().trim_end_matches('-').parse().ok();
            }
        }
        let seen = {
            let mut counts = counts.lock().unwrap();
            let count = counts.entry(path.clone()).or_insert(0);
            *count += 1;
            *count
        };
        let fault = faults.lock().unwrap().get(&path).cloned();
        let body = files.lock().unwrap().get(&path).cloned();
        let mut out = stream.try_clone().unwrap();
        if let Some(Fault::Redirect { location }) = &fault {
            let head =
                format!("HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n");
            let _ = out.write_all(head.as_bytes());
            continue;
        }
        if let Some(Fault::Endless) = fault {
            let _ = out.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
            let zeros = vec![0u8; 64 << 10];
            while out.write_all(&zeros).is_ok() {
                sent.fetch_add(zeros.len() as u64, Ordering::Relaxed);
            }
            return;
        }
        let Some(mut body) = body.filter(|_| !matches!(fault, Some(Fault::Missing))) else {
            let _ = out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            continue;
        };
        if let Some(Fault::ServerError { times }) = fault {
            if seen <= times {
                let _ = out.write_all(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n");
                continue;
            }
        }
        if let Some(Fault::WrongBytes) = fault {
            let middle = body.len() / 2;
            if let Some(byte) = body.get_mut(middle) {
                *byte ^= 0xFF;
            }
        }
        let total = body.len();
        let start = match (range_start, &fault) {
            (Some(_), Some(Fault::CutThenIgnoreRange { .. })) => 0,
            (Some(start), _) if start < total => start,
            _ => 0,
        };
        let head = if start > 0 {
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{total}\r\nETag: \"v1\"\r\n\r\n",
                total - start,
                total - 1
            )
        } else {
            format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\nETag: \"v1\"\r\n\r\n")
        };
        if out.write_all(head.as_bytes()).is_err() {
            return;
        }
        let slice = &body[start..];
        match fault {
            Some(Fault::CutThenIgnoreRange { bytes }) if seen == 1 => {
                let _ = out.write_all(&slice[..bytes.min(slice.len())]);
                return;
            }
            Some(Fault::CutAfter { bytes, times }) if seen <= times => {
                let _ = out.write_all(&slice[..bytes.min(slice.len())]);
                sent.fetch_add(bytes.min(slice.len()) as u64, Ordering::Relaxed);
                return;
            }
            Some(Fault::Stall {
                bytes,
                pause,
                times,
            }) if seen <= times => {
                let _ = out.write_all(&slice[..bytes.min(slice.len())]);
                let _ = out.flush();
                std::thread::sleep(pause);
                return;
            }
            _ => {
                if out.write_all(slice).is_err() {
                    return;
                }
                sent.fetch_add(slice.len() as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Writes `files` under `root` and a manifest next to them; returns the manifest path.
pub fn write_catalog(root: &Path, files: &[(String, Vec<u8>)]) -> PathBuf {
    for (path, bytes) in files {
        let target = root.join(&path[1..]);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, bytes).unwrap();
    }
    let manifest = root.join("manifest.json");
    appliance_testkit::Manifest::of(files)
        .write(&manifest)
        .unwrap();
    manifest
}
