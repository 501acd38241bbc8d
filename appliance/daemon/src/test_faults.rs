//! Test-only faults, read once from the environment when `applianced run` starts, for the
//! black-box tests of the panic policy and the watchdog (`tests/panic.rs`):
//!
//! - `APPLIANCED_TEST_PANIC=upkeep` the upkeep thread panics in its first pass;
//!   `=serve` a task on the serving runtime panics once the daemon is ready;
//!   `=control` the control-socket task panics as it starts.
//! - `APPLIANCED_TEST_STALL=upkeep` the upkeep thread stops making progress (sleeps forever
//!   in its first pass).
//!
//! Production units never set these variables; when one is set the daemon logs a warning.
//! This module only parses; the places that fault are in `run.rs` and `upkeep.rs`.

/// Where a test fault strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    Upkeep,
    Serve,
    Control,
}

/// The faults armed for this run (none unless a test set the variables).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestFaults {
    pub panic: Option<Place>,
    pub stall: Option<Place>,
}

const PANIC_VARIABLE: &str = "APPLIANCED_TEST_PANIC";
const STALL_VARIABLE: &str = "APPLIANCED_TEST_STALL";

impl TestFaults {
    /// Reads the variables; an unknown value is logged and ignored.
    pub fn from_env() -> TestFaults {
        let faults = TestFaults {
            panic: place_from_env(
                PANIC_VARIABLE,
                &[Place::Upkeep, Place::Serve, Place::Control],
            ),
            stall: place_from_env(STALL_VARIABLE, &[Place::Upkeep]),
        };
        if faults != TestFaults::default() {
            tracing::warn!(
                ?faults,
                "test faults armed: this daemon will misbehave on purpose"
            );
        }
        faults
    }

    pub fn panics_in(&self, place: Place) -> bool {
        self.panic == Some(place)
    }

    pub fn stalls_in(&self, place: Place) -> bool {
        self.stall == Some(place)
    }
}

fn place_from_env(variable: &str, allowed: &[Place]) -> Option<Place> {
    let value = std::env::var(variable).ok()?;
    let place = parse_place(&value).filter(|place| allowed.contains(place));
    if place.is_none() {
        tracing::warn!(variable, value, "unknown test fault ignored");
    }
    place
}

fn parse_place(value: &str) -> Option<Place> {
    match value {
        "upkeep" => Some(Place::Upkeep),
        "serve" => Some(Place::Serve),
        "control" => Some(Place::Control),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_place, Place};

    #[test]
    fn places_parse_by_name() {
        let cases = [
            ("upkeep", Some(Place::Upkeep)),
            ("serve", Some(Place::Serve)),
            ("control", Some(Place::Control)),
            ("", None),
            ("Upkeep", None),
        ];
        for (value, expected) in cases {
            assert_eq!(parse_place(value), expected, "{value:?}");
        }
    }
}
