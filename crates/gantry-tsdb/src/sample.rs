//! Samples read from the OpenMetrics text Gantry's own registry writes.

/// A series' identity: its metric name and labels (sorted by name).
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct SeriesKey {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

impl SeriesKey {
    pub fn label(&self, name: &str) -> Option<&str> {
        if name == "__name__" {
            return Some(&self.name);
        }
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample line of an exposition (comments, `# EOF` and exemplars skipped; a line that
/// does not parse is skipped too: the producer is our own registry).
pub fn parse(text: &str) -> Vec<(SeriesKey, f64)> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<(SeriesKey, f64)> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let (ls, after) = parse_labels(r)?;
        labels = ls;
        rest = after;
    }
    let value = rest.trim_start().split(' ').next()?;
    let v = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    labels.sort();
    Some((SeriesKey { name, labels }, v))
}

/// `k="v",k2="v2"}` → the labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((out, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        out.push((key, value));
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_samples_with_escaped_labels() {
        let text = "# HELP x X.\n# TYPE x counter\n\
                    x_total{route=\"a\\\"b\",service=\"s,}\"} 3 # {trace_id=\"t\"} 1\n\
                    up 1\n\
                    d_bucket{le=\"+Inf\"} +Inf\n\
                    broken{x=\"1} 2\n\
                    # EOF\n";
        let got = parse(text);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0].0.name, "x_total");
        assert_eq!(
            got[0].0.labels,
            vec![
                ("route".into(), "a\"b".into()),
                ("service".into(), "s,}".into())
            ]
        );
        assert_eq!(got[0].1, 3.0);
        assert_eq!(
            got[1],
            (
                SeriesKey {
                    name: "up".into(),
                    labels: vec![]
                },
                1.0
            )
        );
        assert!(got[2].1.is_infinite());
    }
}
