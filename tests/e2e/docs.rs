//! The operator guides cannot drift from the program: every command line in a ```sh block of
//! `docs/site-operator.md`, `docs/study-lead.md` and `certs/README.md` that starts with `fedhcc` is
//! checked against the real binary's help, word by word: each subcommand exists where it is used,
//! and each `--flag` is one that (sub)command accepts.

use crate::harness::fedhcc;
use std::collections::BTreeMap;
use std::path::Path;

/// The `fedhcc` command lines of the ```sh blocks of a Markdown file: (line number, words).
fn commands(markdown: &str) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        let t = line.trim();
        if t.starts_with("```") {
            in_sh = !in_sh && (t == "```sh" || t == "```bash" || t == "```shell");
            continue;
        }
        if !in_sh {
            continue;
        }
        let (start, text) = match pending.take() {
            Some((n, s)) => (n, format!("{s} {t}")),
            None => (i + 1, t.to_string()),
        };
        if let Some(cont) = text.strip_suffix('\\') {
            pending = Some((start, cont.trim_end().to_string()));
            continue;
        }
        // The command itself: up to a comment, pipe, redirection or a second command.
        let words: Vec<String> = text
            .split_whitespace()
            .take_while(|w| !w.starts_with('#') && !["|", "&&", ";", ">", ">>", "||"].contains(w))
            .map(str::to_string)
            .collect();
        if words.first().is_some_and(|w| w == "fedhcc") {
            out.push((start, words));
        }
    }
    out
}

/// What `fedhcc <path> --help` says: subcommands, and options with whether each takes a value.
#[derive(Debug)]
struct Help {
    subcommands: Vec<String>,
    options: BTreeMap<String, bool>,
}

fn parse_help(text: &str) -> Help {
    let mut section = "";
    let mut subcommands = Vec::new();
    let mut options = BTreeMap::new();
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line.trim_end_matches(':');
            continue;
        }
        let t = line.trim_start();
        match section {
            "Commands" if line.starts_with("  ") && !line.starts_with("    ") => {
                if let Some(name) = t.split_whitespace().next() {
                    subcommands.push(name.to_string());
                }
            }
            "Options" if t.starts_with('-') => {
                for (k, w) in t.split_whitespace().enumerate() {
                    let w = w.trim_end_matches(',');
                    if let Some(long) = w.strip_prefix("--") {
                        let (name, inline_value) = match long.split_once(['=', '<']) {
                            Some((n, _)) => (n, true),
                            None => (long, false),
                        };
                        let next = t.split_whitespace().nth(k + 1).unwrap_or("");
                        options.insert(format!("--{name}"), inline_value || next.starts_with('<'));
                    } else if w.len() == 2 && w.starts_with('-') {
                        options.insert(w.to_string(), false);
                    }
                }
            }
            _ => {}
        }
    }
    Help { subcommands, options }
}

struct HelpCache(BTreeMap<Vec<String>, Help>);

impl HelpCache {
    fn get(&mut self, path: &[String]) -> &Help {
        self.0.entry(path.to_vec()).or_insert_with(|| {
            let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
            args.push("--help");
            let (ok, out, err) = fedhcc(&args);
            assert!(ok, "`fedhcc {}` failed: {err}", args.join(" "));
            parse_help(&out)
        })
    }
}

/// Checks one command line; returns the subcommand path it names.
fn check(cache: &mut HelpCache, file: &str, line: usize, words: &[String]) -> Vec<String> {
    let shown = words.join(" ");
    let mut path: Vec<String> = Vec::new();
    let mut i = 1;
    while i < words.len() {
        let w = &words[i];
        if w.starts_with('-') {
            let name = w.split('=').next().unwrap_or(w);
            // A flag is accepted where it is given: on this (sub)command, or globally.
            let help = cache.get(&path);
            let takes_value = *help.options.get(name).unwrap_or_else(|| {
                panic!(
                    "{file}:{line}: `{shown}`: `fedhcc {} --help` has no option {name} (it has {:?})",
                    path.join(" "),
                    help.options.keys().collect::<Vec<_>>()
                )
            });
            if takes_value && !w.contains('=') {
                assert!(i + 1 < words.len(), "{file}:{line}: `{shown}`: {name} needs a value");
                i += 1;
            }
        } else {
            let help = cache.get(&path);
            if help.subcommands.iter().any(|s| s == w) {
                path.push(w.clone());
            } else {
                assert!(
                    help.subcommands.iter().all(|s| s == "help"),
                    "{file}:{line}: `{shown}`: `{w}` is not a subcommand of `fedhcc {}` (it has {:?})",
                    path.join(" "),
                    help.subcommands
                );
            }
        }
        i += 1;
    }
    path
}

#[test]
fn every_fedhcc_command_in_the_guides_exists_with_its_flags() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let mut cache = HelpCache(BTreeMap::new());
    for (file, must_cover) in [
        (
            "site-operator.md",
            &["certs request", "data check", "preprocess", "client", "client status", "audit verify"][..],
        ),
        ("../certs/README.md", &["certs init", "certs issue", "certs revoke"][..]),
        (
            "study-lead.md",
            &[
                "certs init",
                "certs sign",
                "certs revoke",
                "server",
                "status",
                "admin start",
                "admin pause",
                "admin resume",
                "admin abort",
                "admin allow",
                "admin disallow",
                "admin export",
                "export",
                "report",
                "validate",
            ][..],
        ),
    ] {
        let text = std::fs::read_to_string(docs.join(file)).unwrap();
        let cmds = commands(&text);
        let mut covered = Vec::new();
        for (line, words) in &cmds {
            covered.push(check(&mut cache, file, *line, words).join(" "));
        }
        for want in must_cover {
            assert!(covered.iter().any(|c| c == want), "{file} shows no `fedhcc {want}` command; it shows {covered:?}");
        }
    }
}

#[test]
fn the_guide_checker_catches_a_wrong_flag_and_a_wrong_subcommand() {
    let md = "text\n```sh\nfedhcc status --config a.toml --json   # comment\nsudo true\n```\n```toml\nfedhcc = 1\n```\n\
              ```sh\nfedhcc admin --config a.toml \\\n    export --out m.fhcp | tee log\n```\n";
    let cmds = commands(md);
    assert_eq!(cmds.len(), 2);
    assert_eq!(cmds[0], (3, ["fedhcc", "status", "--config", "a.toml", "--json"].map(String::from).to_vec()));
    assert_eq!(cmds[1].1.join(" "), "fedhcc admin --config a.toml export --out m.fhcp");
    let mut cache = HelpCache(BTreeMap::new());
    assert_eq!(check(&mut cache, "t", 1, &cmds[1].1), ["admin", "export"]);
    let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    for bad in
        ["fedhcc status --config a.toml --jsn", "fedhcc admin --config a.toml exprot", "fedhcc admin export --config a"]
    {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&mut cache, "t", 1, &words(bad))));
        assert!(r.is_err(), "`{bad}` was accepted");
    }
}

/// The tests a section of a page names (`module::test_name`, in backticks), as `(path, test name)`.
fn named_tests(markdown: &str, heading: &str) -> Vec<(String, String)> {
    let section = markdown.split(heading).nth(1).unwrap_or_default();
    let section = section.split("\n## ").next().unwrap_or_default();
    let mut out = Vec::new();
    for quoted in section.split('`').skip(1).step_by(2) {
        if !quoted.contains("::") || quoted.contains(' ') {
            continue;
        }
        let name = quoted.rsplit("::").next().unwrap_or_default();
        if name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') && name.contains('_') {
            out.push((quoted.to_string(), name.to_string()));
        }
    }
    out
}

/// Every Rust source under tests/, server/, client/ and shared/, concatenated.
fn test_sources(root: &Path) -> String {
    let mut sources = String::new();
    let mut stack = vec![root.join("tests"), root.join("server"), root.join("client"), root.join("shared")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                sources.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    sources
}

/// The tests `page`'s section `heading` names that do not exist in the sources.
fn missing_tests(page: &str, heading: &str, at_least: usize) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join(page)).unwrap();
    let named = named_tests(&text, heading);
    assert!(named.len() >= at_least, "found {} test names in {page} under {heading}", named.len());
    let sources = test_sources(root);
    named.iter().filter(|(_, name)| !sources.contains(&format!("fn {name}("))).map(|(q, _)| q.clone()).collect()
}

#[test]
fn every_test_architecture_md_names_for_an_invariant_exists() {
    let missing = missing_tests("ARCHITECTURE.md", "## Invariants", 15);
    assert!(missing.is_empty(), "ARCHITECTURE.md names tests that do not exist: {missing:?}");
}

#[test]
fn every_test_the_threat_model_names_exists() {
    let missing = missing_tests("docs/security.md", "## The protections", 12);
    assert!(missing.is_empty(), "docs/security.md names tests that do not exist: {missing:?}");
}

#[test]
fn the_invariant_test_finder_reads_names_and_skips_code() {
    let md =
        "## Invariants\n- rule: `a::b_c`, `fedhcc_core::aggregation::check_strategy` and `x y::z`.\n## Next\n`q::r_s`";
    let names: Vec<_> = named_tests(md, "## Invariants").into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["b_c", "check_strategy"]);
}
