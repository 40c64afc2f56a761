//! Walk filters, the subset of containerd's filter syntax that snapshot walks use.
//!
//! A request carries a list of filter strings; a snapshot matches when any string matches
//! (containerd ORs them). One string is a comma-separated list of conditions that must all
//! hold: `FIELD` (present and non-empty), `FIELD==VALUE`, `FIELD!=VALUE`. FIELD is `name`,
//! `parent`, `kind` or `labels.KEY`, where KEY may be quoted (`labels."containerd.io/gc.root"`)
//! and VALUE may be quoted. Regular expressions (`~=`) are refused rather than ignored, so
//! a caller never gets a wider match than it asked for.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// What a filter looks at in one snapshot.
pub struct Subject<'a> {
    /// the snapshot's key or name
    pub name: &'a str,
    /// its parent's name ("" for none)
    pub parent: &'a str,
    /// "active", "view" or "committed"
    pub kind: &'a str,
    /// its labels
    pub labels: &'a BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Name,
    Parent,
    Kind,
    Label(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
}

/// One parsed filter string: all conditions must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter(Vec<(Field, Op)>);

/// The parsed filters of one walk: any one must match (none given: everything matches).
#[derive(Debug, Clone, Default)]
pub struct Filters(Vec<Filter>);

impl Filters {
    /// Parse every string of a Walk request.
    pub fn parse(strings: &[String]) -> Result<Filters> {
        let mut out = Vec::new();
        for s in strings.iter().filter(|s| !s.trim().is_empty()) {
            out.push(Filter::parse(s)?);
        }
        Ok(Filters(out))
    }

    /// Whether the snapshot is selected.
    pub fn matches(&self, s: &Subject<'_>) -> bool {
        self.0.is_empty() || self.0.iter().any(|f| f.matches(s))
    }
}

fn bad(s: &str, why: &str) -> Error {
    Error::InvalidArgument(format!("filter {s:?}: {why}"))
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        &v[1..v.len() - 1]
    } else {
        v
    }
}

/// Split on commas that are not inside double quotes.
fn split_conditions(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

impl Filter {
    fn parse(s: &str) -> Result<Filter> {
        let mut conds = Vec::new();
        for c in split_conditions(s) {
            let c = c.trim();
            if c.is_empty() {
                return Err(bad(s, "empty condition"));
            }
            if c.contains("~=") {
                return Err(bad(s, "regular expressions (~=) are not supported"));
            }
            let (field, op) = if let Some((f, v)) = c.split_once("!=") {
                (f, Op::Ne(unquote(v).to_string()))
            } else if let Some((f, v)) = c.split_once("==") {
                (f, Op::Eq(unquote(v).to_string()))
            } else if c.contains('=') {
                return Err(bad(s, "use == or != to compare"));
            } else {
                (c, Op::Present)
            };
            let field = match field.trim() {
                "name" => Field::Name,
                "parent" => Field::Parent,
                "kind" => Field::Kind,
                f => match f.strip_prefix("labels.") {
                    Some(k) if !unquote(k).is_empty() => Field::Label(unquote(k).to_string()),
                    _ => return Err(bad(s, "fields are name, parent, kind and labels.KEY")),
                },
            };
            conds.push((field, op));
        }
        Ok(Filter(conds))
    }

    fn matches(&self, s: &Subject<'_>) -> bool {
        self.0.iter().all(|(field, op)| {
            let value = match field {
                Field::Name => Some(s.name),
                // as containerd's adaptor: always there, "" for none, so that
                // `parent==""` selects base layers (containerd's metadata store walks with it
                // after a remote Prepare of a base layer answered AlreadyExists)
                Field::Parent => Some(s.parent),
                Field::Kind => Some(s.kind),
                Field::Label(k) => s.labels.get(k).map(String::as_str),
            };
            match op {
                Op::Present => value.is_some_and(|v| !v.is_empty()),
                Op::Eq(want) => value == Some(want.as_str()),
                Op::Ne(want) => value != Some(want.as_str()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_select_as_containerd_does() {
        let mut labels = BTreeMap::new();
        labels.insert("containerd.io/gc.root".to_string(), "x".to_string());
        let s = Subject {
            name: "default/1/a",
            parent: "",
            kind: "committed",
            labels: &labels,
        };
        let cases: &[(&[&str], bool)] = &[
            (&[], true),
            (&["kind==committed"], true),
            (&["kind==active"], false),
            (&["kind==active", "name==default/1/a"], true),
            (&["kind==committed,parent"], false),
            (&["kind==committed,parent!=x"], true),
            (&[r#"parent=="""#], true),
            (&[r#"labels."containerd.io/gc.root"==x,parent=="""#], true),
            (&["parent==x"], false),
            (&[r#"labels."containerd.io/gc.root""#], true),
            (&[r#"labels."containerd.io/gc.root"==x"#], true),
            (&[r#"labels."containerd.io/gc.root"=="y""#], false),
            (&["labels.other"], false),
            (&[r#"name=="default/1/a""#], true),
        ];
        for (strings, want) in cases {
            let strings: Vec<String> = strings.iter().map(|s| s.to_string()).collect();
            let f = Filters::parse(&strings).expect("valid filter");
            assert_eq!(f.matches(&s), *want, "{strings:?}");
        }
    }

    #[test]
    fn malformed_filters_are_refused() {
        for s in ["name~=a.*", "size==1", "name=a", "a,,b", "labels."] {
            assert!(
                matches!(Filters::parse(&[s.to_string()]), Err(Error::InvalidArgument(_))),
                "{s}"
            );
        }
    }
}
