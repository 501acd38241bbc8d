//! The fill's admin routes until the control socket exists: `GET /fill` (progress, last
//! result, per-source counts), `POST /fill[?manifest=URL-or-path]` (start an out-of-window
//! fill) and `POST /fill/cancel`.

use appliance_fill::{Filler, ManifestLocation};
use appliance_serve::AdminExtension;
use std::sync::Arc;

pub struct FillAdmin {
    pub filler: Arc<Filler>,
}

impl AdminExtension for FillAdmin {
    fn handle(
        &self,
        method: &str,
        path: &str,
        query: Option<&str>,
    ) -> Option<(u16, serde_json::Value)> {
        match (method, path) {
            ("GET", "/fill") => Some((200, self.filler.status_json())),
            ("POST", "/fill") => Some(self.start(query)),
            ("POST", "/fill/cancel") => {
                self.filler.cancel();
                Some((
                    200,
                    serde_json::json!({ "cancelled": self.filler.is_running() }),
                ))
            }
            (_, "/fill" | "/fill/cancel") => Some((405, serde_json::json!({ "error": "method" }))),
            _ => None,
        }
    }
}

impl FillAdmin {
    fn start(&self, query: Option<&str>) -> (u16, serde_json::Value) {
        if self.filler.is_running() {
            return (
                409,
                serde_json::json!({ "error": "a fill is already running" }),
            );
        }
        let manifest = query.and_then(|query| {
            query.split('&').find_map(|pair| {
                let value = pair.strip_prefix("manifest=")?;
                let decoded = percent_decode(value)?;
                Some(ManifestLocation::parse(&decoded))
            })
        });
        let filler = Arc::clone(&self.filler);
        tokio::spawn(async move {
            filler.run_once(manifest).await;
        });
        (202, serde_json::json!({ "started": true }))
    }
}

/// Decodes %XX escapes; `None` for a malformed escape or non-UTF-8 result.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(at + 1..at + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                at += 3;
            }
            b'+' => {
                out.push(b' ');
                at += 1;
            }
            byte => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn query_values_decode_or_refuse() {
        let cases = [
            ("http%3A%2F%2Fo%2Fm.json", Some("http://o/m.json")),
            ("plain", Some("plain")),
            ("%zz", None),
            ("%4", None),
            ("%ff", None),
        ];
        for (text, expected) in cases {
            assert_eq!(percent_decode(text).as_deref(), expected, "{text}");
        }
    }
}
