//! The Grafana dashboards in `tools/grafana/` against the real daemon: each dashboard is
//! well-formed (unique panel ids and uids, a title, a datasource reference and a grid position
//! on every panel), and every metric that a panel or template variable queries is in a
//! `/metrics` scrape of `applianced` after a fill, a hit, a miss and a range request. Owns the
//! hand-written scanner that finds metric names in PromQL; it must not need a Prometheus.

mod origin;
mod util;

use appliance_testkit::{Config, Fill, Manifest};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use util::{formatted_drives, Daemon, Scratch};

/// The prefix of every metric the appliance exports.
const METRIC_PREFIX: &str = "appliance_";

/// The reference every panel and query uses: the dashboard's `datasource` variable.
const DATASOURCE_UID: &str = "${datasource}";

/// Grafana's grid is 24 columns wide.
const GRID_COLUMNS: u64 = 24;

fn dashboard_folder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/grafana")
}

/// Every dashboard in `tools/grafana/`: (file name, parsed JSON).
fn dashboards() -> Vec<(String, Value)> {
    let mut found: Vec<(String, Value)> = std::fs::read_dir(dashboard_folder())
        .expect("tools/grafana/")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let json =
                serde_json::from_str(&text).unwrap_or_else(|error| panic!("{name}: {error}"));
            (name, json)
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!found.is_empty(), "no dashboard in tools/grafana/");
    found
}

/// Every panel, rows first and the panels nested in (collapsed) rows after their row.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        all.push(panel);
        all.extend(panel["panels"].as_array().into_iter().flatten());
    }
    all
}

/// The PromQL of a panel's targets.
fn panel_exprs(panel: &Value) -> impl Iterator<Item = &str> {
    let targets = panel["targets"].as_array().into_iter().flatten();
    targets.filter_map(|target| target["expr"].as_str())
}

/// (where, PromQL) for every query: panel targets and template variables.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        for expr in panel_exprs(panel) {
            found.push((format!("panel {title:?}"), expr.to_string()));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let place = format!("variable ${}", variable["name"].as_str().unwrap_or("?"));
        let query = &variable["query"];
        for text in [&query["query"], query, &variable["definition"]] {
            if let Some(text) = text.as_str() {
                found.push((place.clone(), text.to_string()));
            }
        }
    }
    found
}

fn is_name_start(byte: u8) -> bool {
    byte.is_ascii_alphabetic() || byte == b'_' || byte == b':'
}

fn is_name_byte(byte: u8) -> bool {
    is_name_start(byte) || byte.is_ascii_digit()
}

/// Every identifier that starts with `appliance_` in a PromQL expression, in order. Skips
/// quoted strings (label values, regexes, `label_replace` arguments) and `#` comments.
fn metric_names(promql: &str) -> Vec<String> {
    let bytes = promql.as_bytes();
    let mut names = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let byte = bytes[at];
        if matches!(byte, b'"' | b'\'' | b'`') {
            at += 1;
            while at < bytes.len() && bytes[at] != byte {
                // A backslash escapes the next byte, except in raw (backtick) strings.
                at += if bytes[at] == b'\\' && byte != b'`' {
                    2
                } else {
                    1
                };
            }
            at += 1;
        } else if byte == b'#' {
            while at < bytes.len() && bytes[at] != b'\n' {
                at += 1;
            }
        } else if is_name_byte(byte) {
            // A word: a name, a keyword, a number or a duration; only names can match.
            let start = at;
            while at < bytes.len() && is_name_byte(bytes[at]) {
                at += 1;
            }
            let word = &promql[start..at];
            if is_name_start(bytes[start]) && word.starts_with(METRIC_PREFIX) {
                names.push(word.to_string());
            }
        } else {
            at += 1;
        }
    }
    names
}

/// The metric names a scrape offers: every sample's name, and every `# TYPE`/`# HELP`
/// family (so a family with no samples yet counts), with `_total` for a counter family.
fn scraped_names(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        let family = line
            .strip_prefix("# TYPE ")
            .or_else(|| line.strip_prefix("# HELP "));
        if let Some(family) = family {
            let mut words = family.split_whitespace();
            let name = words.next().unwrap_or_default().to_string();
            if line.starts_with("# TYPE ") && words.next() == Some("counter") {
                names.insert(format!("{name}_total"));
            }
            names.insert(name);
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            names.insert(name.to_string());
        }
    }
    names
}

/// What is wrong with one dashboard's structure; `uids` collects uids across dashboards.
fn structure_problems(name: &str, dashboard: &Value, uids: &mut BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    match dashboard["uid"].as_str() {
        Some(uid) if !uid.is_empty() => {
            if !uids.insert(uid.to_string()) {
                problems.push(format!("{name}: uid {uid:?} is used twice"));
            }
        }
        _ => problems.push(format!("{name}: no uid")),
    }
    if !dashboard["schemaVersion"].is_u64() || !dashboard["title"].is_string() {
        problems.push(format!("{name}: no schemaVersion or title"));
    }
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|variable| variable["name"].as_str())
        .collect();
    for wanted in ["datasource", "instance"] {
        if !variables.contains(&wanted) {
            problems.push(format!("{name}: no ${wanted} variable"));
        }
    }
    let mut ids = BTreeSet::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or_default();
        let place = format!("{name}: panel {} {title:?}", panel["id"]);
        problems.extend(panel_problems(&place, panel));
        if !panel["id"].as_u64().is_some_and(|id| ids.insert(id)) {
            problems.push(format!("{place}: no id, or an id used twice"));
        }
    }
    problems
}

/// What is wrong with one panel: title, grid position, datasource of the panel and its queries.
fn panel_problems(place: &str, panel: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if panel["title"].as_str().unwrap_or_default().is_empty() {
        problems.push(format!("{place}: no title"));
    }
    let grid = &panel["gridPos"];
    let [h, w, x, y] = ["h", "w", "x", "y"].map(|key| grid[key].as_u64());
    match (h, w, x, y) {
        (Some(h), Some(w), Some(x), Some(_)) if h > 0 && w > 0 && x + w <= GRID_COLUMNS => {}
        _ => problems.push(format!(
            "{place}: gridPos {grid} is missing or off the grid"
        )),
    }
    if panel["type"] == "row" {
        return problems;
    }
    let targets = panel["targets"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if targets.is_empty() {
        problems.push(format!("{place}: no query"));
    }
    for source in std::iter::once(panel).chain(targets) {
        if source["datasource"]["uid"] != DATASOURCE_UID {
            problems.push(format!("{place}: datasource is not {DATASOURCE_UID}"));
        }
    }
    problems
}

#[test]
fn metric_names_are_found_in_promql() {
    let check = |promql: &str, expected: &[&str]| {
        assert_eq!(metric_names(promql), expected, "{promql}");
    };
    check(
        "rate(appliance_http_sent_bytes_total{instance=~\"$instance\"}[5m]) * 8 / 1e9",
        &["appliance_http_sent_bytes_total"],
    );
    check(
        "appliance_a / appliance_b{drive=\"x\"} offset 5m",
        &["appliance_a", "appliance_b"],
    );
    check(
        "label_replace(appliance_a, \"class\", \"${1}xx\", \"status\", \"appliance_not\")",
        &["appliance_a"],
    );
    check(
        "appliance_a{l=\"q\\\"appliance_not\"} + appliance_b",
        &["appliance_a", "appliance_b"],
    );
    check(
        "appliance_a{l=`raw\\`} - appliance_b",
        &["appliance_a", "appliance_b"],
    );
    check(
        "appliance_a # appliance_not\n+ appliance_b",
        &["appliance_a", "appliance_b"],
    );
    check("label_values(appliance_a, instance)", &["appliance_a"]);
    check("my_appliance_not + 2appliance_not + up", &[]);
    check("appliance_a:rate5m", &["appliance_a:rate5m"]);
    // A label named like a metric counts as one: the check errs towards reporting.
    check("sum by (appliance_label) (x)", &["appliance_label"]);
}

#[test]
fn scraped_names_take_samples_and_families() {
    let scrape = "# HELP appliance_a A.\n# TYPE appliance_a counter\nappliance_a_total 1\n\
                  # TYPE appliance_b gauge\n# HELP appliance_c C.\n\
                  appliance_d{drive=\"/dev/x y\"} 2\n# EOF\n";
    let expected = [
        "appliance_a",
        "appliance_a_total",
        "appliance_b",
        "appliance_c",
        "appliance_d",
    ];
    assert_eq!(
        scraped_names(scrape),
        expected.iter().map(|name| name.to_string()).collect()
    );
}

#[test]
fn queries_include_nested_panels_and_variables() {
    let dashboard = serde_json::json!({
        "panels": [
            {"type": "row", "title": "Open", "panels": []},
            {"title": "Top", "targets": [{"expr": "appliance_a"}]},
            {"type": "row", "title": "Closed", "panels": [
                {"title": "Nested", "targets": [{"expr": "appliance_b"}, {"refId": "B"}]}
            ]}
        ],
        "templating": {"list": [
            {"name": "instance", "definition": "label_values(appliance_c, instance)",
             "query": {"query": "label_values(appliance_c, instance)"}},
            {"name": "old", "query": "label_values(appliance_d, instance)"},
            {"name": "datasource", "query": "prometheus"}
        ]}
    });
    let found: Vec<(String, String)> = queries(&dashboard);
    let expected = [
        ("panel \"Top\"", "appliance_a"),
        ("panel \"Nested\"", "appliance_b"),
        ("variable $instance", "label_values(appliance_c, instance)"),
        ("variable $instance", "label_values(appliance_c, instance)"),
        ("variable $old", "label_values(appliance_d, instance)"),
        ("variable $datasource", "prometheus"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(place, query)| (place.to_string(), query.to_string()))
        .collect();
    assert_eq!(found, expected);
}

#[test]
fn dashboards_are_well_formed() {
    let mut uids = BTreeSet::new();
    let mut problems = Vec::new();
    for (name, dashboard) in dashboards() {
        problems.extend(structure_problems(&name, &dashboard, &mut uids));
        assert!(!queries(&dashboard).is_empty(), "{name}: no query");
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_broken_dashboard_is_reported() {
    let dashboard = serde_json::json!({
        "uid": "x", "schemaVersion": 39, "title": "T",
        "templating": {"list": [{"name": "datasource"}]},
        "panels": [
            {"id": 1, "type": "row", "title": "Row", "gridPos": {"h": 1, "w": 24, "x": 0, "y": 0},
             "panels": [{"id": 1, "title": "", "gridPos": {"h": 4, "w": 12, "x": 16, "y": 1},
                         "datasource": {"uid": "${datasource}"},
                         "targets": [{"expr": "appliance_a", "datasource": {"uid": "other"}}]}]},
            {"id": 3, "title": "Bare"}
        ]
    });
    let mut uids: BTreeSet<String> = ["x".to_string()].into();
    let problems = structure_problems("d.json", &dashboard, &mut uids);
    let expected = [
        "d.json: uid \"x\" is used twice",
        "d.json: no $instance variable",
        "d.json: panel 1 \"\": no title",
        "d.json: panel 1 \"\": gridPos {\"h\":4,\"w\":12,\"x\":16,\"y\":1} is missing or off the grid",
        "d.json: panel 1 \"\": datasource is not ${datasource}",
        "d.json: panel 1 \"\": no id, or an id used twice",
        "d.json: panel 3 \"Bare\": gridPos null is missing or off the grid",
        "d.json: panel 3 \"Bare\": no query",
        "d.json: panel 3 \"Bare\": datasource is not ${datasource}",
    ];
    assert_eq!(problems, expected);
}

#[test]
fn the_readme_lists_every_panel_with_its_metrics() {
    let readme = std::fs::read_to_string(dashboard_folder().join("README.md")).unwrap();
    let mut problems = Vec::new();
    for (name, dashboard) in dashboards() {
        for panel in panels(&dashboard)
            .into_iter()
            .filter(|panel| panel["type"] != "row")
        {
            let title = panel["title"].as_str().unwrap_or_default();
            let cell = format!("| {title} |");
            let Some(line) = readme.lines().find(|line| line.contains(&cell)) else {
                problems.push(format!("{name}: panel {title:?} is not in the table"));
                continue;
            };
            for metric in panel_exprs(panel).flat_map(metric_names) {
                if !line.contains(&format!("`{metric}`")) {
                    problems.push(format!("{name}: {metric} is not in the row of {title:?}"));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "tools/grafana/README.md:\n{}",
        problems.join("\n")
    );
}

/// A daemon on two file-backed drives, filled from a local origin, after a hit, a miss and a
/// range request: its `/metrics` text.
fn scrape_after_traffic() -> String {
    let scratch = Scratch::new("dashboard");
    let files: Vec<(String, Vec<u8>)> = (0..4u8)
        .map(|number| {
            let bytes = (0..200_000u32)
                .map(|at| at.to_le_bytes()[0] ^ number)
                .collect();
            (format!("/dashboard/title-{number}.mp4"), bytes)
        })
        .collect();
    let mut served: HashMap<String, Vec<u8>> = files.iter().cloned().collect();
    let manifest = Manifest::of(&files).to_json().into_bytes();
    served.insert("/manifest.json".into(), manifest);
    let origin = origin::FaultOrigin::start(served, HashMap::new());
    let drives = formatted_drives(&scratch, 2, 64 << 20, 4);
    let config = Config {
        fill: Fill {
            manifest: Some(format!("{}/manifest.json", origin.url())),
            sources: vec![origin.url()],
            ..Fill::default()
        },
        ..Config::new(&drives)
    };
    let daemon = Daemon::start(&scratch, config);
    daemon
        .ctl()
        .ok(&["fill", "--wait"])
        .expect("the fill succeeds");
    let (path, bytes) = &files[0];
    assert!(daemon.get(path).as_ref() == Some(bytes), "a hit on {path}");
    assert!(daemon.get("/dashboard/missing.mp4").is_none(), "a miss");
    let range = Command::new("curl")
        .args(["-sf", "-r", "100-199", &daemon.url(path)])
        .output()
        .unwrap();
    assert!(range.stdout == bytes[100..200], "a range of {path}");
    let (status, metrics) = daemon.admin("GET", "/metrics");
    assert_eq!(status, 200, "{metrics}");
    metrics
}

#[test]
fn every_metric_the_dashboards_query_is_in_a_real_scrape() {
    let metrics = scrape_after_traffic();
    let scraped = scraped_names(&metrics);
    // Missing metric -> where it is queried.
    let mut missing: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut queried = 0;
    for (name, dashboard) in dashboards() {
        for (place, promql) in queries(&dashboard) {
            for metric in metric_names(&promql) {
                queried += 1;
                if !scraped.contains(&metric) {
                    missing
                        .entry(metric)
                        .or_default()
                        .insert(format!("{name} {place}"));
                }
            }
        }
    }
    assert!(queried > 0, "the dashboards query no appliance metric");
    let lines: Vec<String> = missing
        .iter()
        .map(|(metric, places)| {
            let places: Vec<&str> = places.iter().map(String::as_str).collect();
            format!("{metric}: {}", places.join(", "))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} queried metric(s) not in /metrics:\n{}\n\nthe scrape:\n{metrics}",
        missing.len(),
        lines.join("\n")
    );
}
