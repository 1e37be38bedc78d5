//! The two exposition formats a scraper may ask for, chosen from its `Accept` header:
//! OpenMetrics 1.0 (what `prometheus_client` writes) and the Prometheus text format 0.0.4.
//!
//! The two differ in more than the content type: an OpenMetrics counter family `x` has samples
//! named `x_total` (its metadata names `x`), where the 0.0.4 format names the family by its
//! samples (`# TYPE x_total counter`); an info family `x` is a gauge `x_info` there; `# UNIT`,
//! exemplars and `# EOF` do not exist in it. A scraper that reads 0.0.4 text with OpenMetrics
//! names (promtool, Prometheus's metadata API) finds no metadata for any counter.

use std::collections::HashMap;

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
    /// `text/plain; version=0.0.4`.
    Text,
}

impl Format {
    /// The format an `Accept` header prefers: OpenMetrics only when it ranks OpenMetrics above
    /// the 0.0.4 text (by `q`); the text format otherwise (no header, `*/*`, anything else).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text;
        };
        let (mut om, mut text) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let mut q = 1.0f32;
            let mut version = None;
            for p in parts {
                if let Some((k, v)) = p.split_once('=') {
                    match k.trim().to_ascii_lowercase().as_str() {
                        "q" => q = v.trim().parse().unwrap_or(0.0),
                        "version" => version = Some(v.trim().trim_matches('"').to_string()),
                        _ => {}
                    }
                }
            }
            if !(0.0..=1.0).contains(&q) {
                continue;
            }
            match media.as_str() {
                // Only versions this writes (1.0.0; 0.0.1 is its draft and reads the same).
                "application/openmetrics-text"
                    if version
                        .as_deref()
                        .is_none_or(|v| v == "1.0.0" || v == "0.0.1") =>
                {
                    om = om.max(q)
                }
                "text/plain" => text = text.max(q),
                _ => {}
            }
        }
        if om > 0.0 && om > text {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// OpenMetrics text (as `prometheus_client` writes it) in the 0.0.4 text format.
pub fn openmetrics_to_text(om: &str) -> String {
    // Each family's type, from its `# TYPE` line (which follows `# HELP`).
    let types: HashMap<&str, &str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .collect();
    // The name a family has in 0.0.4 (that of its samples).
    let renamed = |family: &str| -> Option<String> {
        match types.get(family).copied() {
            Some("counter") => Some(format!("{family}_total")),
            Some("info") => Some(format!("{family}_info")),
            _ => None,
        }
    };
    let mut out = String::with_capacity(om.len());
    let mut counter_created: Option<String> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (family, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = renamed(family).unwrap_or_else(|| family.to_string());
            // prometheus_client writes help text as given; 0.0.4 escapes `\` and newlines.
            let help = help.replace('\\', "\\\\").replace('\n', "\\n");
            out.push_str(&format!("# HELP {name} {help}\n"));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            counter_created = (kind == "counter").then(|| format!("{family}_created"));
            let name = renamed(family).unwrap_or_else(|| family.to_string());
            let kind = match kind {
                "counter" | "gauge" | "histogram" | "summary" => kind,
                "info" => "gauge",
                _ => "untyped",
            };
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with('#') {
            // `# UNIT`, `# EOF`: not in 0.0.4.
        } else if !line.is_empty() {
            if counter_created
                .as_deref()
                .is_some_and(|c| sample_name(line) == c)
            {
                continue;
            }
            // An exemplar (` # {...} v`) follows the value: 0.0.4 has none. A ` # ` inside a
            // label value is quoted, so the cut looks for it after the label set only.
            let body_end = labels_end(line);
            let cut = line[body_end..]
                .find(" # ")
                .map_or(line.len(), |i| body_end + i);
            out.push_str(&line[..cut]);
            out.push('\n');
        }
    }
    out
}

/// Where a sample's name and label set end (quoted values may hold `}` and `#`).
fn labels_end(line: &str) -> usize {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    if !line[name_end..].starts_with('{') {
        return name_end;
    }
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in line[name_end..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return name_end + i + 1,
            _ => {}
        }
    }
    line.len()
}

fn sample_name(line: &str) -> &str {
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    &line[..end]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn accept_headers_choose_the_format() {
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for (accept, want) in [
            (None, Format::Text),
            (Some(prom), Format::OpenMetrics),
            (
                Some("text/plain;version=0.0.4;q=0.9,*/*;q=0.1"),
                Format::Text,
            ),
            (Some("*/*"), Format::Text),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            (
                Some("application/openmetrics-text; version=2.0.0"),
                Format::Text,
            ),
            (
                Some("application/openmetrics-text;q=0.5, text/plain"),
                Format::Text,
            ),
            (Some("application/openmetrics-text;q=0"), Format::Text),
            (
                Some("application/openmetrics-text;q=nonsense"),
                Format::Text,
            ),
            (Some(""), Format::Text),
        ] {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn openmetrics_becomes_valid_text() {
        let om = "# HELP gantry_requests Requests \\ served.\n\
                  # TYPE gantry_requests counter\n\
                  gantry_requests_total{route=\"a # b\"} 3 # {trace_id=\"x\"} 1.0\n\
                  gantry_requests_created{route=\"a # b\"} 1.7e9\n\
                  # HELP gantry_up Whether up.\n\
                  # TYPE gantry_up gauge\n\
                  # UNIT gantry_up seconds\n\
                  gantry_up 1\n\
                  # HELP gantry_build Build.\n\
                  # TYPE gantry_build info\n\
                  gantry_build_info{version=\"1\"} 1\n\
                  # HELP gantry_d Durations.\n\
                  # TYPE gantry_d histogram\n\
                  gantry_d_bucket{le=\"+Inf\"} 1\n\
                  gantry_d_sum 0.5\n\
                  gantry_d_count 1\n\
                  # EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP gantry_requests_total Requests \\\\ served.\n\
             # TYPE gantry_requests_total counter\n\
             gantry_requests_total{route=\"a # b\"} 3\n\
             # HELP gantry_up Whether up.\n\
             # TYPE gantry_up gauge\n\
             gantry_up 1\n\
             # HELP gantry_build_info Build.\n\
             # TYPE gantry_build_info gauge\n\
             gantry_build_info{version=\"1\"} 1\n\
             # HELP gantry_d Durations.\n\
             # TYPE gantry_d histogram\n\
             gantry_d_bucket{le=\"+Inf\"} 1\n\
             gantry_d_sum 0.5\n\
             gantry_d_count 1\n"
        );
    }
}
