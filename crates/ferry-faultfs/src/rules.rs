//! Control commands and fault rules: parsing the one-line text protocol and deciding which
//! operation a rule hits. No I/O.

use globset::{GlobBuilder, GlobMatcher};

/// How many more operations a rule affects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Count {
    /// This many more times (at least one while the rule exists).
    Times(u64),
    /// Until `clear`.
    Always,
}

impl std::fmt::Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Count::Times(n) => write!(f, "{n}"),
            Count::Always => f.write_str("always"),
        }
    }
}

/// A path pattern as typed and as compiled. `*` and `?` do not cross `/`; `**` does.
#[derive(Clone, Debug)]
pub(crate) struct Pattern {
    text: String,
    matcher: GlobMatcher,
}

impl Pattern {
    pub(crate) fn new(text: &str) -> Result<Self, String> {
        let glob = GlobBuilder::new(text)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("bad glob {text:?}: {e}"))?;
        Ok(Self {
            text: text.to_owned(),
            matcher: glob.compile_matcher(),
        })
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        self.matcher.is_match(path)
    }

    pub(crate) fn text(&self) -> &str {
        &self.text
    }
}

/// One parsed control command.
#[derive(Clone, Debug)]
pub(crate) enum Command {
    PowerLoss,
    Tear(u64),
    FailFsync(Pattern, Count),
    Enospc(Pattern, Count),
    SlowFsync(Pattern, u64),
    Clear,
    Status,
}

/// The longest stall `slow-fsync` accepts (one hour), so a typo cannot wedge a test run.
pub(crate) const MAX_STALL_MILLIS: u64 = 3_600_000;

/// Parses one command line. The error names what was wrong; nothing is applied.
pub(crate) fn parse(line: &str) -> Result<Command, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&verb, args)) = words.split_first() else {
        return Err("empty command".into());
    };
    let arity = |n: usize, usage: &str| {
        if args.len() == n {
            Ok(())
        } else {
            Err(format!(
                "{verb} takes {n} argument(s), got {}: usage `{usage}`",
                args.len()
            ))
        }
    };
    match verb {
        "power-loss" => {
            arity(0, "power-loss")?;
            Ok(Command::PowerLoss)
        }
        "tear" => {
            arity(1, "tear SEED")?;
            let seed = args[0].parse::<u64>().map_err(|_| {
                format!("tear: SEED must be an unsigned integer, got {:?}", args[0])
            })?;
            Ok(Command::Tear(seed))
        }
        "fail-fsync" => {
            arity(2, "fail-fsync GLOB N|always")?;
            Ok(Command::FailFsync(
                Pattern::new(args[0])?,
                count(verb, args[1])?,
            ))
        }
        "enospc" => {
            arity(2, "enospc GLOB N|always")?;
            Ok(Command::Enospc(
                Pattern::new(args[0])?,
                count(verb, args[1])?,
            ))
        }
        "slow-fsync" => {
            arity(2, "slow-fsync GLOB MILLIS")?;
            let millis = args[1].parse::<u64>().map_err(|_| {
                format!(
                    "slow-fsync: MILLIS must be an unsigned integer, got {:?}",
                    args[1]
                )
            })?;
            if millis > MAX_STALL_MILLIS {
                return Err(format!(
                    "slow-fsync: MILLIS {millis} is over the limit of {MAX_STALL_MILLIS}"
                ));
            }
            Ok(Command::SlowFsync(Pattern::new(args[0])?, millis))
        }
        "clear" => {
            arity(0, "clear")?;
            Ok(Command::Clear)
        }
        "status" => {
            arity(0, "status")?;
            Ok(Command::Status)
        }
        other => Err(format!(
            "unknown command {other:?} (expected power-loss, tear, fail-fsync, enospc, \
             slow-fsync, clear or status)"
        )),
    }
}

fn count(verb: &str, word: &str) -> Result<Count, String> {
    if word == "always" {
        return Ok(Count::Always);
    }
    match word.parse::<u64>() {
        Ok(0) => Err(format!("{verb}: N must be at least 1 (or `always`)")),
        Ok(n) => Ok(Count::Times(n)),
        Err(_) => Err(format!(
            "{verb}: N must be a positive integer or `always`, got {word:?}"
        )),
    }
}

#[derive(Clone, Debug)]
struct CountedRule {
    pattern: Pattern,
    left: Count,
}

/// The fault rules in force.
#[derive(Clone, Debug, Default)]
pub(crate) struct Rules {
    fail_fsync: Vec<CountedRule>,
    enospc: Vec<CountedRule>,
    slow_fsync: Vec<(Pattern, u64)>,
}

impl Rules {
    pub(crate) fn add_fail_fsync(&mut self, pattern: Pattern, left: Count) {
        self.fail_fsync.push(CountedRule { pattern, left });
    }

    pub(crate) fn add_enospc(&mut self, pattern: Pattern, left: Count) {
        self.enospc.push(CountedRule { pattern, left });
    }

    /// A later `slow-fsync` for the same glob replaces the earlier one.
    pub(crate) fn add_slow_fsync(&mut self, pattern: Pattern, millis: u64) {
        self.slow_fsync.retain(|(p, _)| p.text() != pattern.text());
        self.slow_fsync.push((pattern, millis));
    }

    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }

    pub(crate) fn has_fsync_rules(&self) -> bool {
        !self.fail_fsync.is_empty() || !self.slow_fsync.is_empty()
    }

    pub(crate) fn has_enospc_rules(&self) -> bool {
        !self.enospc.is_empty()
    }

    /// Whether an fsync on `path` fails; consumes one use of the first matching rule.
    pub(crate) fn take_fail_fsync(&mut self, path: &str) -> bool {
        take(&mut self.fail_fsync, path)
    }

    /// Whether a space-consuming operation on `path` fails with ENOSPC; consumes one use.
    pub(crate) fn take_enospc(&mut self, path: &str) -> bool {
        take(&mut self.enospc, path)
    }

    /// How long an fsync on `path` stalls: the longest matching rule's delay.
    pub(crate) fn stall_millis(&self, path: &str) -> Option<u64> {
        self.slow_fsync
            .iter()
            .filter(|(p, _)| p.matches(path))
            .map(|(_, ms)| *ms)
            .max()
    }

    /// How many rules are in force, for the `ok` answers.
    pub(crate) fn len(&self) -> usize {
        self.fail_fsync.len() + self.enospc.len() + self.slow_fsync.len()
    }
}

fn take(rules: &mut Vec<CountedRule>, path: &str) -> bool {
    let Some(i) = rules.iter().position(|r| r.pattern.matches(path)) else {
        return false;
    };
    if let Count::Times(n) = &mut rules[i].left {
        *n -= 1;
        if *n == 0 {
            rules.remove(i);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        assert!(matches!(parse("power-loss"), Ok(Command::PowerLoss)));
        assert!(matches!(parse("  tear 42 "), Ok(Command::Tear(42))));
        assert!(matches!(
            parse("fail-fsync wal/*.log 3"),
            Ok(Command::FailFsync(_, Count::Times(3)))
        ));
        assert!(matches!(
            parse("enospc ** always"),
            Ok(Command::Enospc(_, Count::Always))
        ));
        assert!(matches!(
            parse("slow-fsync **/x 250"),
            Ok(Command::SlowFsync(_, 250))
        ));
        assert!(matches!(parse("clear"), Ok(Command::Clear)));
        assert!(matches!(parse("status"), Ok(Command::Status)));
    }

    #[test]
    fn refuses_malformed_commands_with_a_reason() {
        for (line, needle) in [
            ("", "empty"),
            ("reboot", "unknown command"),
            ("tear", "takes 1"),
            ("tear -1", "SEED"),
            ("tear 1 2", "takes 1"),
            ("fail-fsync *", "takes 2"),
            ("fail-fsync * 0", "at least 1"),
            ("fail-fsync * many", "positive integer"),
            ("fail-fsync a[ 1", "bad glob"),
            ("enospc * -3", "positive integer"),
            ("slow-fsync * soon", "MILLIS"),
            ("slow-fsync * 99999999999", "limit"),
            ("power-loss now", "takes 0"),
            ("status please", "takes 0"),
            ("clear all", "takes 0"),
        ] {
            let err = parse(line).expect_err(line);
            assert!(err.contains(needle), "{line:?}: {err}");
        }
    }

    #[test]
    fn globs_respect_path_separators() {
        let p = Pattern::new("*.log").unwrap();
        assert!(p.matches("a.log"));
        assert!(!p.matches("d/a.log"));
        let p = Pattern::new("**/*.log").unwrap();
        assert!(p.matches("a.log"));
        assert!(p.matches("d/e/a.log"));
        let p = Pattern::new("**").unwrap();
        assert!(p.matches("."));
        assert!(p.matches("d/e"));
    }

    #[test]
    fn counted_rules_run_out_and_always_does_not() {
        let mut rules = Rules::default();
        rules.add_fail_fsync(Pattern::new("a").unwrap(), Count::Times(2));
        rules.add_fail_fsync(Pattern::new("b").unwrap(), Count::Always);
        assert!(!rules.take_fail_fsync("c"));
        assert!(rules.take_fail_fsync("a"));
        assert!(rules.take_fail_fsync("a"));
        assert!(!rules.take_fail_fsync("a"));
        for _ in 0..10 {
            assert!(rules.take_fail_fsync("b"));
        }
        rules.add_slow_fsync(Pattern::new("*").unwrap(), 5);
        rules.add_slow_fsync(Pattern::new("s").unwrap(), 9);
        rules.add_slow_fsync(Pattern::new("*").unwrap(), 7);
        assert_eq!(rules.stall_millis("s"), Some(9));
        assert_eq!(rules.stall_millis("t"), Some(7));
        assert_eq!(rules.stall_millis("d/t"), None);
        rules.clear();
        assert_eq!(rules.len(), 0);
        assert!(!rules.take_fail_fsync("b"));
    }
}
