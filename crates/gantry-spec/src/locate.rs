//! Map byte offsets and field paths back to line and column in the spec text.

use toml::de::{DeTable, DeValue};

pub(crate) struct Locator<'a> {
    text: &'a str,
    root: Option<DeValue<'a>>,
}

impl<'a> Locator<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        let root = DeTable::parse(text)
            .ok()
            .map(|t| DeValue::Table(t.into_inner()));
        Self { text, root }
    }

    /// 1-based (line, column) of a byte offset; columns count characters.
    pub(crate) fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..floor_char_boundary(self.text, offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    /// Position of the deepest existing item on a dotted path such as
    /// `services.orders.routes[0].path_prefix`.
    pub(crate) fn position_of(&self, path: &str) -> Option<(usize, usize)> {
        let mut cur = self.root.as_ref()?;
        let mut span = None;
        for seg in segments(path) {
            let next = match seg {
                Seg::Key(k) => cur.get(k),
                Seg::Index(i) => cur.get(i),
            };
            match next {
                Some(v) => {
                    span = Some(v.span());
                    cur = v.get_ref();
                }
                None => break,
            }
        }
        span.map(|s| self.line_col(s.start))
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

enum Seg<'p> {
    Key(&'p str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Seg::Key(key));
        }
        for idx in rest.split(['[', ']']).filter(|s| !s.is_empty()) {
            if let Ok(i) = idx.parse() {
                out.push(Seg::Index(i));
            }
        }
    }
    out
}

/// Remove the item at `path` (`a.b[2].c`) from a document; whether it was there.
pub(crate) fn remove(doc: &mut toml::Table, path: &str) -> bool {
    let segs = segments(path);
    let Some((last, parents)) = segs.split_last() else {
        return false;
    };
    let mut cur: &mut toml::Value = match parents.first() {
        None => {
            return match last {
                Seg::Key(k) => doc.remove(*k).is_some(),
                Seg::Index(_) => false,
            }
        }
        Some(Seg::Key(k)) => match doc.get_mut(*k) {
            Some(v) => v,
            None => return false,
        },
        Some(Seg::Index(_)) => return false,
    };
    for seg in &parents[1..] {
        let next = match (seg, cur) {
            (Seg::Key(k), toml::Value::Table(t)) => t.get_mut(*k),
            (Seg::Index(i), toml::Value::Array(a)) => a.get_mut(*i),
            _ => None,
        };
        match next {
            Some(v) => cur = v,
            None => return false,
        }
    }
    match (last, cur) {
        (Seg::Key(k), toml::Value::Table(t)) => t.remove(*k).is_some(),
        (Seg::Index(i), toml::Value::Array(a)) if *i < a.len() => {
            a.remove(*i);
            true
        }
        _ => false,
    }
}
