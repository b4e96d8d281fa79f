//! The audit trail's schema as `src/audit.rs`'s module documentation states it, in one table:
//! the audit module's unit tests and the binary's integration tests both hold lines to it, so a
//! key renamed or dropped in the code, or in the documentation, fails both.

use std::collections::BTreeSet;

/// The keys the table in `source` (the text of `src/audit.rs`) gives `event` (`exchange`,
/// `refusal` or `delivery`): every key whose cell in that event's column is not `—`.
pub fn documented(source: &str, event: &str) -> BTreeSet<String> {
    let column = match event {
        "exchange" => 1,
        "refusal" => 2,
        "delivery" => 3,
        other => panic!("no event {other}"),
    };
    source
        .lines()
        .filter_map(|l| l.strip_prefix("//! |"))
        .map(|row| row.split('|').map(str::trim).collect::<Vec<_>>())
        .filter(|cells| cells[0].starts_with('`') && cells.get(column).is_some_and(|c| *c != "—"))
        .flat_map(|cells| {
            cells[0]
                .split(',')
                .map(|k| k.trim().trim_matches('`').to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}
