//! The crate's layering, checked: every top-level part of `src/` may import only parts in layers
//! below its own. An import that points up the layering, one between two parts of the same layer, and
//! any cycle between parts fail this test, naming the file and line. docs/architecture.md explains the
//! layers; change both together.
//!
//! What counts as an import: every `crate::<part>` path in code (in `use` lines, grouped
//! `use crate::{a, b::c}` lines and inline paths) and every `super::` path that climbs out of a
//! top-level part (`super::x` in `src/a/mod.rs` is `crate::x`). Comments and string literals are
//! skipped. `src/lib.rs` only declares the parts; `src/main.rs` is the binary, outside the library.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom to top. A part may import parts of lower layers only: not its own layer's (the
/// parts of a layer stand side by side) and not higher ones.
const LAYERS: &[&[&str]] = &[
    // Foundations: no imports from the crate.
    &["clock", "shutdown", "codec"],
    // The configuration and the deployment record: built on the codec's record types only.
    &["config", "record"],
    // The error type (wraps config and record errors), metrics, and the pure routing decision (cohort).
    &["error", "telemetry", "cohort"],
    // The one place Kafka clients are built; the transactional stage.
    &["kafka"],
    // Built on Kafka: dead letters, and the control plane that carries the record to every instance.
    &["dead_letter", "control"],
    // The stages: requests routed, predictions merged into decisions, outcomes scored.
    &["route", "merge", "quality"],
    // Rollouts that drive themselves: they read decisions and scored outcomes and write the record.
    &["rollout"],
    // `switchyard run` wired together, and the tools beside it.
    &["service", "tools"],
    // The command line.
    &["cli"],
];

/// A reference from one part to another, where it was found.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Import {
    from: String,
    to: String,
    file: String,
    line: usize,
}

#[test]
fn imports_point_down_the_layering_and_make_no_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = Vec::new();
    collect(&root.join("src"), &mut sources);
    assert!(sources.len() > 20, "found only {} files under src/", sources.len());
    let files: Vec<(String, String)> = sources
        .iter()
        .map(|p| {
            let name = p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
            (name, std::fs::read_to_string(p).unwrap())
        })
        .collect();
    let problems = check(&files);
    assert!(problems.is_empty(), "the layering is broken (see docs/architecture.md):\n\n{}\n", problems.join("\n"));
}

/// The test can fail: an upward import, a side-by-side import, a cycle and an unknown part are each
/// found in made-up sources.
#[test]
fn the_check_finds_what_it_is_for() {
    let upward = check(&[
        ("src/record/plan.rs".into(), "use crate::rollout::guard::Budget;\n".into()),
        ("src/rollout/mod.rs".into(), "use crate::record::plan::Plan;\n".into()),
    ]);
    assert!(upward.iter().any(|p| p.contains("src/record/plan.rs:1") && p.contains("points up")), "{upward:#?}");
    assert!(
        upward
            .iter()
            .any(|p| p.contains("import cycle between record, rollout") && p.contains("record → rollout → record")),
        "{upward:#?}"
    );
    let beside = check(&[("src/route/mod.rs".into(), "fn f() { crate::merge::run(); }\n".into())]);
    assert!(beside.iter().any(|p| p.contains("same layer")), "{beside:#?}");
    let unknown = check(&[("src/stray.rs".into(), "\n".into())]);
    assert!(unknown.iter().any(|p| p.contains("`stray` is not in the layering")), "{unknown:#?}");
}

#[test]
fn references_are_found_in_code_only_and_super_is_resolved() {
    let text = r##"
use crate::{codec::Millis, config::{self, Config}};
// use crate::rollout::commented_out;
/* crate::control::in_a_block /* nested crate::merge */ */
const S: &str = "crate::route::in_a_string \
    continued";
const R: &str = r#"crate::route::in_a_raw_string"#;
const C: char = '"'; fn f<'a>(x: &'a str) -> i64 { crate::clock::now_millis() }
use super::cohort::hash;
mod tests {
    use super::*;
    use super::super::{telemetry, error::Error};
}
"##;
    assert_eq!(
        references("src/kafka/mod.rs", text),
        [("codec", 2), ("config", 2), ("clock", 8), ("cohort", 9), ("kafka", 11), ("telemetry", 12), ("error", 12)]
            .map(|(part, line)| (part.to_string(), line))
    );
}

/// Every problem with the layering in `files` ((path under the crate, text)), one line each.
fn check(files: &[(String, String)]) -> Vec<String> {
    let layer_of: BTreeMap<&str, usize> =
        LAYERS.iter().enumerate().flat_map(|(i, parts)| parts.iter().map(move |p| (*p, i))).collect();
    let mut problems = Vec::new();
    let mut imports = BTreeSet::new();
    for (file, text) in files {
        let Some(from) = part_of(file) else { continue };
        if !layer_of.contains_key(from.as_str()) {
            problems.push(format!(
                "{file}: part `{from}` is not in the layering: add it to LAYERS in tests/architecture.rs and to \
                 docs/architecture.md"
            ));
            continue;
        }
        for (to, line) in references(file, text) {
            if to != from && to != "*" {
                imports.insert(Import { from: from.clone(), to, file: file.clone(), line });
            }
        }
    }
    let describe = |part: &str| match layer_of.get(part) {
        Some(&i) => format!("{part} (layer {i}: {})", LAYERS[i].join(", ")),
        None => format!("{part} (not in the layering)"),
    };
    for i in &imports {
        let (Some(&from), Some(&to)) = (layer_of.get(i.from.as_str()), layer_of.get(i.to.as_str())) else {
            problems.push(format!("{}:{}: {} imports {}, which is not in the layering", i.file, i.line, i.from, i.to));
            continue;
        };
        if to > from {
            problems.push(format!(
                "{}:{}: {} imports {}: an import that points up the layering",
                i.file,
                i.line,
                describe(&i.from),
                describe(&i.to)
            ));
        } else if to == from {
            problems.push(format!(
                "{}:{}: {} imports {}: parts of the same layer stand side by side and import neither way",
                i.file,
                i.line,
                describe(&i.from),
                describe(&i.to)
            ));
        }
    }
    for (cycle, group) in cycles(&imports) {
        let evidence: Vec<String> = cycle
            .windows(2)
            .map(|w| {
                let i = imports.iter().find(|i| i.from == w[0] && i.to == w[1]).expect("an edge of the cycle");
                format!("{}:{}", i.file, i.line)
            })
            .collect();
        problems.push(format!(
            "import cycle between {}: for one, {} ({})",
            group.join(", "),
            cycle.join(" → "),
            evidence.join(", ")
        ));
    }
    problems
}

/// The top-level part a file belongs to: `src/x.rs` and `src/x/**` are part `x`.
fn part_of(file: &str) -> Option<String> {
    let rest = file.strip_prefix("src/")?;
    if rest == "lib.rs" || rest == "main.rs" || rest.starts_with("bin/") {
        return None;
    }
    Some(rest.split('/').next()?.trim_end_matches(".rs").to_string())
}

/// The module path of a file: `src/a/b.rs` and `src/a/b/mod.rs` are `[a, b]`.
fn module_path(file: &str) -> Vec<String> {
    let rest = file.strip_prefix("src/").unwrap_or(file).trim_end_matches(".rs");
    let mut path: Vec<String> = rest.split('/').map(str::to_string).collect();
    if path.last().is_some_and(|last| last == "mod") {
        path.pop();
    }
    path
}

/// The parts `text` refers to, with their line numbers, in order of appearance: `crate::x…`,
/// `crate::{x…, y…}`, and `super::` chains resolved against the file's module and its inline modules.
fn references(file: &str, text: &str) -> Vec<(String, usize)> {
    let tokens = tokens(text);
    let base = module_path(file);
    // Inline modules (`mod tests { … }`) open: (name, brace depth inside them).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut found = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let (token, line) = (&tokens[i].0, tokens[i].1);
        let next = |k: usize| tokens.get(i + k).map(|t| t.0.as_str());
        match token.as_str() {
            "{" => depth += 1,
            "}" => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            "mod" if next(2) == Some("{") => {
                inline.push((next(1).unwrap_or_default().to_string(), depth + 1));
            }
            "crate" if next(1) == Some("::") && (i == 0 || tokens[i - 1].0 != "$") => {
                if next(2) == Some("{") {
                    found.extend(group_heads(&tokens[i + 3..]).into_iter().map(|p| (p, line)));
                } else if let Some(part) = next(2) {
                    found.push((part.to_string(), line));
                }
            }
            "super" if i == 0 || tokens[i - 1].0 != "::" => {
                let mut path: Vec<String> = base.iter().cloned().chain(inline.iter().map(|(n, _)| n.clone())).collect();
                let mut k = i;
                while tokens.get(k).is_some_and(|t| t.0 == "super") && tokens.get(k + 1).is_some_and(|t| t.0 == "::") {
                    path.pop();
                    k += 2;
                }
                match path.first() {
                    Some(part) => found.push((part.clone(), line)),
                    None if tokens.get(k).is_some_and(|t| t.0 == "{") => {
                        found.extend(group_heads(&tokens[k + 1..]).into_iter().map(|p| (p, line)))
                    }
                    None => found.extend(tokens.get(k).map(|t| (t.0.clone(), line))),
                }
                i = k.max(i + 1);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// The first identifier of each item of a `{ … }` group (the tokens after its `{`).
fn group_heads(tokens: &[(String, usize)]) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0usize;
    let mut expect_head = true;
    for (token, _) in tokens {
        match token.as_str() {
            "{" => depth += 1,
            "}" if depth == 0 => break,
            "}" => depth -= 1,
            "," if depth == 0 => expect_head = true,
            t if expect_head && depth == 0 => {
                heads.push(t.to_string());
                expect_head = false;
            }
            _ => {}
        }
    }
    heads
}

/// The code's tokens that matter here (identifiers, `::`, braces, `$`), with their line numbers;
/// comments, string and character literals dropped.
fn tokens(text: &str) -> Vec<(String, usize)> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut nesting = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    nesting += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    nesting -= 1;
                    i += 2;
                    if nesting == 0 {
                        break;
                    }
                } else {
                    line += usize::from(chars[i] == '\n');
                    i += 1;
                }
            }
        } else if c == 'r' && (at(i + 1) == '"' || (at(i + 1) == '#' && (at(i + 2) == '"' || at(i + 2) == '#')))
            || (c == 'b' && at(i + 1) == 'r' && (at(i + 2) == '"' || at(i + 2) == '#'))
        {
            // A raw string: r"…", r#"…"#, br#"…"#.
            i += if c == 'b' { 2 } else { 1 };
            let mut hashes = 0;
            while at(i) == '#' {
                hashes += 1;
                i += 1;
            }
            i += 1; // the opening quote
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i] == '"' && (1..=hashes).all(|h| at(i + h) == '#') {
                    i += 1 + hashes;
                    break;
                }
                line += usize::from(chars[i] == '\n');
                i += 1;
            }
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1; // the escaped character is skipped below, counted if it is a newline
                }
                line += usize::from(at(i) == '\n');
                i += 1;
            }
            i += 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{..}', '"'), or a lifetime ('a), which is skipped as a word.
            if at(i + 1) == '\\' {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
            }
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((chars[start..i].iter().collect(), line));
        } else if c == ':' && at(i + 1) == ':' {
            out.push(("::".to_string(), line));
            i += 2;
        } else {
            if matches!(c, '{' | '}' | '$' | '*' | ',') {
                out.push((c.to_string(), line));
            } else if !c.is_whitespace() {
                out.push((";".to_string(), line));
            }
            i += 1;
        }
    }
    out
}

/// The cycles between parts: each group of parts that reach one another (a strongly connected
/// component), as the shortest cycle through its first part (closed: it ends where it starts) and the
/// group's parts.
fn cycles(imports: &BTreeSet<Import>) -> Vec<(Vec<String>, Vec<String>)> {
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for i in imports {
        graph.entry(&i.from).or_default().insert(&i.to);
        graph.entry(&i.to).or_default();
    }
    // The shortest path from `a` to `b` (breadth first), if there is one.
    let path = |a: &str, b: &str| -> Option<Vec<String>> {
        let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([a]);
        while let Some(node) = queue.pop_front() {
            for &next in &graph[node] {
                if next == b {
                    let mut path = vec![b.to_string(), node.to_string()];
                    let mut at = node;
                    while at != a {
                        at = came_from[at];
                        path.push(at.to_string());
                    }
                    path.reverse();
                    return Some(path);
                }
                if next != a && !came_from.contains_key(next) {
                    came_from.insert(next, node);
                    queue.push_back(next);
                }
            }
        }
        None
    };
    let mut grouped: BTreeSet<&str> = BTreeSet::new();
    let mut found = Vec::new();
    for &start in graph.keys() {
        if grouped.contains(start) {
            continue;
        }
        let Some(cycle) = path(start, start) else { continue };
        let group: Vec<&str> = graph
            .keys()
            .copied()
            .filter(|&p| p == start || (path(start, p).is_some() && path(p, start).is_some()))
            .collect();
        grouped.extend(&group);
        found.push((cycle, group.iter().map(|p| p.to_string()).collect()));
    }
    found
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}
