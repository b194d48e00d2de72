//! Subscription routing rules: Dapr's `routes.rules[].match`, a CEL expression over the
//! CloudEvent, in this documented subset:
//!
//! - paths `event.<attribute>` and deeper into JSON data, `event.data.order.total`;
//! - literals: strings in double or single quotes (`\\`, `\"`, `\'` escapes), numbers,
//!   `true`, `false`, `null`;
//! - comparisons `==`, `!=`, `<`, `<=`, `>`, `>=` (ordering for numbers and strings);
//! - `&&`, `||`, `!`, and parentheses;
//! - a path alone is true when its value is `true`.
//!
//! A missing attribute is `null`; comparing values of different kinds is false for `==` (true
//! for `!=`) and false for orderings. Anything else (functions, `in`, arithmetic, macros) is
//! refused when the subscription is loaded, with the position and what was expected.

use serde_json::Value;

/// A parsed rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    text: String,
    expr: Expr,
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Compare(Operand, Op, Operand),
    Truthy(Operand),
}

#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Path(Vec<String>),
    Literal(Value),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A rule that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("match `{expression}` at character {position}: {reason}")]
pub struct RuleError {
    /// The rule's text.
    pub expression: String,
    /// Character offset of the problem.
    pub position: usize,
    /// What was expected.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Num(f64),
    Dot,
    LParen,
    RParen,
    Not,
    And,
    Or,
    Cmp(Op),
}

fn tokenize(text: &str) -> Result<Vec<(usize, Token)>, (usize, String)> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        let two = |next: char| chars.get(i + 1) == Some(&next);
        let token = match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '.' => Token::Dot,
            '(' => Token::LParen,
            ')' => Token::RParen,
            '&' if two('&') => {
                i += 1;
                Token::And
            }
            '|' if two('|') => {
                i += 1;
                Token::Or
            }
            '=' if two('=') => {
                i += 1;
                Token::Cmp(Op::Eq)
            }
            '!' if two('=') => {
                i += 1;
                Token::Cmp(Op::Ne)
            }
            '!' => Token::Not,
            '<' if two('=') => {
                i += 1;
                Token::Cmp(Op::Le)
            }
            '<' => Token::Cmp(Op::Lt),
            '>' if two('=') => {
                i += 1;
                Token::Cmp(Op::Ge)
            }
            '>' => Token::Cmp(Op::Gt),
            '"' | '\'' => {
                let quote = c;
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err((start, "unterminated string".into())),
                        Some('\\') => match chars.get(i + 1) {
                            Some(e @ ('\\' | '"' | '\'')) => {
                                s.push(*e);
                                i += 2;
                            }
                            _ => return Err((i, "unknown escape (use \\\\, \\\" or \\')".into())),
                        },
                        Some(q) if *q == quote => break,
                        Some(other) => {
                            s.push(*other);
                            i += 1;
                        }
                    }
                }
                Token::Str(s)
            }
            c if c.is_ascii_digit()
                || (c == '-' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                let mut j = i + 1;
                while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == '.') {
                    j += 1;
                }
                let literal: String = chars[i..j].iter().collect();
                let n = literal
                    .parse()
                    .map_err(|_| (start, format!("{literal:?} is not a number")))?;
                i = j - 1;
                Token::Num(n)
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut j = i + 1;
                while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                let ident: String = chars[i..j].iter().collect();
                i = j - 1;
                Token::Ident(ident)
            }
            other => return Err((start, format!("unexpected {other:?}"))),
        };
        out.push((start, token));
        i += 1;
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    at: usize,
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at).map(|(_, t)| t)
    }

    fn position(&self) -> usize {
        self.tokens.get(self.at).map_or(self.end, |(p, _)| *p)
    }

    fn fail<T>(&self, reason: impl Into<String>) -> Result<T, (usize, String)> {
        Err((self.position(), reason.into()))
    }

    fn or(&mut self) -> Result<Expr, (usize, String)> {
        self.chain(&Token::Or, Self::and, Expr::Or)
    }

    fn and(&mut self) -> Result<Expr, (usize, String)> {
        self.chain(&Token::And, Self::unary, Expr::And)
    }

    /// `operand (op operand)*`, left-associative.
    fn chain(
        &mut self,
        op: &Token,
        operand: fn(&mut Self) -> Result<Expr, (usize, String)>,
        join: fn(Box<Expr>, Box<Expr>) -> Expr,
    ) -> Result<Expr, (usize, String)> {
        let mut left = operand(self)?;
        while self.peek() == Some(op) {
            self.at += 1;
            left = join(Box::new(left), Box::new(operand(self)?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, (usize, String)> {
        match self.peek() {
            Some(Token::Not) => {
                self.at += 1;
                Ok(Expr::Not(Box::new(self.unary()?)))
            }
            Some(Token::LParen) => {
                self.at += 1;
                let inner = self.or()?;
                if self.peek() != Some(&Token::RParen) {
                    return self.fail("expected ')'");
                }
                self.at += 1;
                Ok(inner)
            }
            _ => self.comparison(),
        }
    }

    fn comparison(&mut self) -> Result<Expr, (usize, String)> {
        let left = self.operand()?;
        match self.peek() {
            Some(Token::Cmp(op)) => {
                let op = *op;
                self.at += 1;
                let right = self.operand()?;
                Ok(Expr::Compare(left, op, right))
            }
            _ => Ok(Expr::Truthy(left)),
        }
    }

    fn operand(&mut self) -> Result<Operand, (usize, String)> {
        let token = self.peek().cloned();
        match token {
            Some(Token::Str(s)) => {
                self.at += 1;
                Ok(Operand::Literal(Value::String(s)))
            }
            Some(Token::Num(n)) => {
                self.at += 1;
                Ok(Operand::Literal(
                    serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number),
                ))
            }
            Some(Token::Ident(word)) => {
                self.at += 1;
                match word.as_str() {
                    "true" => Ok(Operand::Literal(Value::Bool(true))),
                    "false" => Ok(Operand::Literal(Value::Bool(false))),
                    "null" => Ok(Operand::Literal(Value::Null)),
                    "event" => {
                        let mut path = Vec::new();
                        while self.peek() == Some(&Token::Dot) {
                            self.at += 1;
                            match self.peek().cloned() {
                                Some(Token::Ident(name)) => {
                                    self.at += 1;
                                    path.push(name);
                                }
                                _ => return self.fail("expected an attribute name after '.'"),
                            }
                        }
                        if path.is_empty() {
                            return self.fail("expected '.' and an attribute after 'event'");
                        }
                        if self.peek() == Some(&Token::LParen) {
                            return self.fail("function calls are not in the supported subset");
                        }
                        Ok(Operand::Path(path))
                    }
                    other => {
                        self.at -= 1;
                        self.fail(format!(
                            "{other:?} is not supported (paths start with 'event.')"
                        ))
                    }
                }
            }
            _ => self.fail("expected a path (event.…), a string, a number, true, false or null"),
        }
    }
}

impl Rule {
    /// Parses a rule.
    pub fn parse(text: &str) -> Result<Self, RuleError> {
        let error = |(position, reason): (usize, String)| RuleError {
            expression: text.to_string(),
            position,
            reason,
        };
        let tokens = tokenize(text).map_err(error)?;
        let end = text.chars().count();
        let mut parser = Parser { tokens, at: 0, end };
        let expr = parser.or().map_err(error)?;
        if parser.at != parser.tokens.len() {
            return Err(error((
                parser.position(),
                "unexpected trailing input".into(),
            )));
        }
        Ok(Self {
            text: text.to_string(),
            expr,
        })
    }

    /// The rule's text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether a CloudEvent (as JSON) matches.
    pub fn matches(&self, event: &Value) -> bool {
        eval(&self.expr, event)
    }
}

fn resolve<'a>(operand: &'a Operand, event: &'a Value) -> &'a Value {
    match operand {
        Operand::Literal(v) => v,
        Operand::Path(path) => path
            .iter()
            .try_fold(event, |v, key| v.get(key))
            .unwrap_or(&Value::Null),
    }
}

fn compare(left: &Value, op: Op, right: &Value) -> bool {
    use std::cmp::Ordering;
    let ordering = match (left, right) {
        (Value::Number(a), Value::Number(b)) => a
            .as_f64()
            .zip(b.as_f64())
            .and_then(|(a, b)| a.partial_cmp(&b)),
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        (Value::Bool(a), Value::Bool(b)) => {
            Some(a.cmp(b)).filter(|_| matches!(op, Op::Eq | Op::Ne))
        }
        (Value::Null, Value::Null) => {
            Some(Ordering::Equal).filter(|_| matches!(op, Op::Eq | Op::Ne))
        }
        _ => None,
    };
    match (op, ordering) {
        (Op::Eq, Some(o)) => o == Ordering::Equal,
        (Op::Ne, Some(o)) => o != Ordering::Equal,
        (Op::Ne, None) => true,
        (Op::Lt, Some(o)) => o == Ordering::Less,
        (Op::Le, Some(o)) => o != Ordering::Greater,
        (Op::Gt, Some(o)) => o == Ordering::Greater,
        (Op::Ge, Some(o)) => o != Ordering::Less,
        (_, None) => false,
    }
}

fn eval(expr: &Expr, event: &Value) -> bool {
    match expr {
        Expr::Or(a, b) => eval(a, event) || eval(b, event),
        Expr::And(a, b) => eval(a, event) && eval(b, event),
        Expr::Not(a) => !eval(a, event),
        Expr::Compare(a, op, b) => compare(resolve(a, event), *op, resolve(b, event)),
        Expr::Truthy(a) => resolve(a, event) == &Value::Bool(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> Value {
        json!({
            "id": "1", "source": "shop", "type": "order.placed", "specversion": "1.0",
            "data": {"total": 120.5, "country": "FR", "vip": true, "items": 3}
        })
    }

    fn check(rule: &str) -> bool {
        Rule::parse(rule).unwrap().matches(&event())
    }

    #[test]
    fn the_dapr_examples_and_the_subset_evaluate() {
        assert!(check(r#"event.type == "order.placed""#));
        assert!(!check(r#"event.type == "widget""#));
        assert!(check(r#"event.type != "widget""#));
        assert!(check(
            r#"event.type == 'order.placed' && event.data.total > 100"#
        ));
        assert!(!check(
            r#"event.type == "order.placed" && event.data.total > 200"#
        ));
        assert!(check(
            r#"event.type == "widget" || event.data.country == "FR""#
        ));
        assert!(check(
            r#"!(event.data.country == "DE") && event.data.items >= 3"#
        ));
        assert!(check("event.data.vip"));
        assert!(!check("!event.data.vip"));
        assert!(check("event.data.items < 3.5 && event.data.items <= 3"));
        assert!(check("event.data.total >= -1"));
        assert!(check(r#"event.source < "znop""#));
    }

    #[test]
    fn missing_attributes_are_null_and_kinds_do_not_mix() {
        assert!(check("event.subject == null"));
        assert!(!check(r#"event.subject == "x""#));
        assert!(check(r#"event.subject != "x""#));
        assert!(!check(r#"event.data.total == "120.5""#));
        assert!(!check(r#"event.data.country > 3"#));
        assert!(!check("event.data.missing.deeper"));
        assert!(!check("event.data.vip < true"));
    }

    #[test]
    fn precedence_is_and_before_or() {
        // false && false || true  ==  (false && false) || true
        assert!(check(
            r#"event.type == "x" && event.type == "y" || event.id == "1""#
        ));
        // true || false && false  ==  true || (false && false)
        assert!(check(
            r#"event.id == "1" || event.type == "x" && event.type == "y""#
        ));
    }

    #[test]
    fn outside_the_subset_is_refused_with_the_position() {
        for (rule, at) in [
            ("event.type.startsWith(\"a\")", 21),
            ("size(event.data) > 1", 0),
            ("event.type == ", 14),
            ("event.type == \"a", 14),
            ("(event.type == \"a\"", 18),
            ("event.type = \"a\"", 11),
            ("event", 5),
            ("event.type == \"a\" extra", 18),
            ("event.data.n + 1 > 2", 13),
        ] {
            let err = Rule::parse(rule).unwrap_err();
            assert_eq!(err.position, at, "{rule}: {err}");
            assert!(err.to_string().contains(rule), "{err}");
        }
    }
}
