//! The daily fill window in local time (`02:00-14:00` in `Europe/Paris`) and the per-box start
//! delay. Pure: the time is always passed in; must not read a clock or sleep.
//!
//! On each local date D the window opens at D's start time and closes at the end time of D (or
//! of the next date when it crosses midnight). Local times are turned into instants with jiff's
//! *compatible* disambiguation: a time skipped by a DST change (02:30 on a spring-forward night)
//! means the instant as many minutes after the transition (03:30), a repeated time (02:30 on a
//! fall-back night) means its first occurrence. So the window is shorter or longer by the DST
//! shift on change days; a window inside a skipped hour is shifted with it (02:10-02:50 runs
//! 03:10-03:50), and one whose shifted start falls at or after its end (02:30-03:00) does not
//! open that day.

use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::Timestamp;

const MINUTES_PER_DAY: u16 = 24 * 60;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FillWindow {
    /// Minutes after local midnight, below 1440.
    pub start_minute: u16,
    /// Minutes after local midnight, below 1440; below `start_minute`: the window crosses
    /// midnight; equal: the window is open all day.
    pub end_minute: u16,
    /// IANA name, e.g. `Europe/Paris` or `UTC`; `parse_window` checks that it exists. A window
    /// built by hand with an unknown zone runs in UTC.
    pub time_zone: String,
}

/// Parses `HH:MM-HH:MM` (hours 0-23; the end may also be `24:00`, meaning midnight) in the
/// named IANA time zone. The error names what is wrong.
pub fn parse_window(text: &str, time_zone: &str) -> Result<FillWindow, String> {
    let Some((start_text, end_text)) = text.trim().split_once('-') else {
        return Err(format!(
            "fill window {text:?}: expected start-end as HH:MM-HH:MM"
        ));
    };
    let start_minute = parse_clock(start_text.trim(), false)
        .map_err(|message| format!("fill window {text:?}: start {message}"))?;
    let end_minute = parse_clock(end_text.trim(), true)
        .map_err(|message| format!("fill window {text:?}: end {message}"))?;
    let zone = TimeZone::get(time_zone)
        .map_err(|zone_error| format!("time zone {time_zone:?}: {zone_error}"))?;
    if zone.is_unknown() {
        return Err(format!("time zone {time_zone:?}: not an IANA time zone"));
    }
    Ok(FillWindow {
        start_minute,
        end_minute,
        time_zone: time_zone.to_string(),
    })
}

/// `HH:MM` or `H:MM` to minutes after midnight; `24:00` (only when `end`) is midnight.
fn parse_clock(text: &str, end: bool) -> Result<u16, String> {
    let Some((hour_text, minute_text)) = text.split_once(':') else {
        return Err(format!("{text:?} is not HH:MM"));
    };
    let digits = |part: &str, max_len: usize| {
        (1..=max_len).contains(&part.len()) && part.bytes().all(|byte| byte.is_ascii_digit())
    };
    if !digits(hour_text, 2) || minute_text.len() != 2 || !digits(minute_text, 2) {
        return Err(format!("{text:?} is not HH:MM"));
    }
    let hour: u16 = hour_text
        .parse()
        .map_err(|_| format!("{text:?} is not HH:MM"))?;
    let minute: u16 = minute_text
        .parse()
        .map_err(|_| format!("{text:?} is not HH:MM"))?;
    if minute > 59 {
        return Err(format!("{text:?}: minute {minute} is not 0-59"));
    }
    if end && hour == 24 && minute == 0 {
        return Ok(0);
    }
    if hour > 23 {
        return Err(format!("{text:?}: hour {hour} is not 0-23"));
    }
    Ok(hour * 60 + minute)
}

impl FillWindow {
    fn is_all_day(&self) -> bool {
        self.start_minute % MINUTES_PER_DAY == self.end_minute % MINUTES_PER_DAY
    }

    fn zone(&self) -> TimeZone {
        TimeZone::get(&self.time_zone).unwrap_or(TimeZone::UTC)
    }

    /// The window that opens on local `date`, as `[start, end)` Unix seconds; `None` when a
    /// DST change leaves it empty that day or the date is out of jiff's range.
    fn opening_on(&self, zone: &TimeZone, date: Date) -> Option<(i64, i64)> {
        let start_minute = self.start_minute % MINUTES_PER_DAY;
        let end_minute = self.end_minute % MINUTES_PER_DAY;
        let end_date = if end_minute <= start_minute {
            date.tomorrow().ok()?
        } else {
            date
        };
        let start = local_instant(zone, date, start_minute)?;
        let end = local_instant(zone, end_date, end_minute)?;
        (start < end).then_some((start, end))
    }

    /// The windows opening on the local dates from the day before `now` to `days_after` days
    /// after it, in order.
    fn openings_around(&self, now_unix_s: i64, days_after: usize) -> Vec<(i64, i64)> {
        let zone = self.zone();
        let Ok(now) = Timestamp::from_second(now_unix_s) else {
            return Vec::new();
        };
        let today = zone.to_datetime(now).date();
        let first = today.yesterday().unwrap_or(today);
        let dates = std::iter::successors(Some(first), |date| date.tomorrow().ok());
        dates
            .take(days_after.saturating_add(2))
            .filter_map(|date| self.opening_on(&zone, date))
            .collect()
    }

    /// The window containing `now`, if any.
    fn current(&self, now_unix_s: i64) -> Option<(i64, i64)> {
        self.openings_around(now_unix_s, 1)
            .into_iter()
            .find(|(start, end)| *start <= now_unix_s && now_unix_s < *end)
    }

    /// Whether the window is open at `now_unix_s`. An all-day window always is.
    pub fn contains(&self, now_unix_s: i64) -> bool {
        self.is_all_day() || self.current(now_unix_s).is_some()
    }

    /// Inside the window: when the current window opened (for an all-day window, `now`).
    /// Outside: the next opening, strictly after `now`. `i64::MAX` when there is none within
    /// jiff's range of years (-9999 to 9999).
    pub fn next_start(&self, now_unix_s: i64) -> i64 {
        if self.is_all_day() {
            return now_unix_s;
        }
        if let Some((start, _)) = self.current(now_unix_s) {
            return start;
        }
        self.openings_around(now_unix_s, 3)
            .into_iter()
            .map(|(start, _)| start)
            .find(|start| *start > now_unix_s)
            .unwrap_or(i64::MAX)
    }

    /// When the window containing `now` closes; `None` outside the window and for an all-day
    /// window, which never closes.
    pub fn current_end(&self, now_unix_s: i64) -> Option<i64> {
        if self.is_all_day() {
            return None;
        }
        self.current(now_unix_s).map(|(_, end)| end)
    }
}

/// `minute` after midnight of local `date`, with compatible disambiguation.
fn local_instant(zone: &TimeZone, date: Date, minute: u16) -> Option<i64> {
    let hour = i8::try_from(minute / 60).ok()?;
    let minute = i8::try_from(minute % 60).ok()?;
    let time = Time::new(hour, minute, 0, 0).ok()?;
    let timestamp = zone.to_timestamp(date.to_datetime(time)).ok()?;
    Some(timestamp.as_second())
}

/// A deterministic delay in `0..=max_delay_s` from a per-box seed (e.g. a hash of the drive
/// UUIDs), so that boxes sharing a window do not all start fetching in the same second.
pub fn start_delay_s(seed: u64, max_delay_s: u64) -> u64 {
    let mixed = split_mix64(seed);
    match max_delay_s.checked_add(1) {
        Some(choices) => mixed % choices,
        None => mixed,
    }
}

/// SplitMix64's finaliser: nearby seeds land far apart.
fn split_mix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start_minute: u16, end_minute: u16, time_zone: &str) -> FillWindow {
        FillWindow {
            start_minute,
            end_minute,
            time_zone: time_zone.into(),
        }
    }

    /// Window text and time zone.
    type WindowInput<'a> = (&'a str, &'a str);

    fn check_parse(input: WindowInput, expected: Result<FillWindow, &str>) {
        let (text, time_zone) = input;
        let actual = parse_window(text, time_zone);
        match (actual, expected) {
            (Ok(actual), Ok(expected)) => assert_eq!(actual, expected, "{input:?}"),
            (Err(actual), Err(expected)) => {
                assert!(actual.starts_with(expected), "{input:?}: {actual}")
            }
            (actual, expected) => panic!("{input:?}: got {actual:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn parse_windows() {
        let cases: [(WindowInput, Result<FillWindow, &str>); 17] = [
            (
                ("02:00-14:00", "Europe/Paris"),
                Ok(window(120, 840, "Europe/Paris")),
            ),
            ((" 2:00 - 14:30 ", "UTC"), Ok(window(120, 870, "UTC"))),
            (("22:00-06:00", "UTC"), Ok(window(1320, 360, "UTC"))),
            (("00:00-24:00", "UTC"), Ok(window(0, 0, "UTC"))),
            (("06:00-06:00", "UTC"), Ok(window(360, 360, "UTC"))),
            (
                ("23:59-00:00", "America/New_York"),
                Ok(window(1439, 0, "America/New_York")),
            ),
            (
                ("25:00-14:00", "UTC"),
                Err("fill window \"25:00-14:00\": start \"25:00\": hour 25"),
            ),
            (
                ("24:00-14:00", "UTC"),
                Err("fill window \"24:00-14:00\": start \"24:00\": hour 24"),
            ),
            (
                ("02:60-14:00", "UTC"),
                Err("fill window \"02:60-14:00\": start \"02:60\": minute 60"),
            ),
            (
                ("02:00-24:01", "UTC"),
                Err("fill window \"02:00-24:01\": end \"24:01\": hour 24"),
            ),
            (
                ("02:00", "UTC"),
                Err("fill window \"02:00\": expected start-end"),
            ),
            (
                ("abc", "UTC"),
                Err("fill window \"abc\": expected start-end"),
            ),
            (
                ("a:bc-14:00", "UTC"),
                Err("fill window \"a:bc-14:00\": start \"a:bc\" is not HH:MM"),
            ),
            (
                ("02:0-14:00", "UTC"),
                Err("fill window \"02:0-14:00\": start \"02:0\" is not HH:MM"),
            ),
            (
                ("02:00-+1:00", "UTC"),
                Err("fill window \"02:00-+1:00\": end \"+1:00\" is not"),
            ),
            (
                ("02:00-14:00", "Mars/Olympus"),
                Err("time zone \"Mars/Olympus\": "),
            ),
            (
                ("02:00-14:00", "Etc/Unknown"),
                Err("time zone \"Etc/Unknown\": "),
            ),
        ];
        for (input, expected) in cases {
            check_parse(input, expected);
        }
        check_parse(("02:00-14:00", ""), Err("time zone \"\": "));
    }

    /// Unix seconds of an RFC 3339 instant.
    fn at(text: &str) -> i64 {
        text.parse::<Timestamp>().expect(text).as_second()
    }

    struct Expected<'a> {
        contains: bool,
        next_start: &'a str,
        current_end: Option<&'a str>,
    }

    fn inside<'a>(start: &'a str, end: &'a str) -> Expected<'a> {
        Expected {
            contains: true,
            next_start: start,
            current_end: Some(end),
        }
    }

    fn outside(next_start: &str) -> Expected<'_> {
        Expected {
            contains: false,
            next_start,
            current_end: None,
        }
    }

    /// `input`: window text, zone, now; checks `contains`, `next_start` and `current_end`.
    fn check(input: (&str, &str, &str), expected: Expected) {
        let (text, time_zone, now) = input;
        let fill_window = parse_window(text, time_zone).expect("test window");
        let now = at(now);
        assert_eq!(fill_window.contains(now), expected.contains, "{input:?}");
        assert_eq!(
            fill_window.next_start(now),
            at(expected.next_start),
            "{input:?}"
        );
        assert_eq!(
            fill_window.current_end(now),
            expected.current_end.map(at),
            "{input:?}"
        );
    }

    #[test]
    fn windows_in_utc() {
        let day = "02:00-14:00";
        check(
            (day, "UTC", "2026-11-23T01:59:59Z"),
            outside("2026-11-23T02:00:00Z"),
        );
        check(
            (day, "UTC", "2026-11-23T02:00:00Z"),
            inside("2026-11-23T02:00:00Z", "2026-11-23T14:00:00Z"),
        );
        check(
            (day, "UTC", "2026-11-23T13:59:59Z"),
            inside("2026-11-23T02:00:00Z", "2026-11-23T14:00:00Z"),
        );
        check(
            (day, "UTC", "2026-11-23T14:00:00Z"),
            outside("2026-11-24T02:00:00Z"),
        );
        check(
            (day, "UTC", "2026-12-31T23:00:00Z"),
            outside("2027-01-01T02:00:00Z"),
        );
        let night = "22:00-06:00";
        check(
            (night, "UTC", "2026-11-23T23:00:00Z"),
            inside("2026-11-23T22:00:00Z", "2026-11-24T06:00:00Z"),
        );
        check(
            (night, "UTC", "2026-11-24T00:00:00Z"),
            inside("2026-11-23T22:00:00Z", "2026-11-24T06:00:00Z"),
        );
        check(
            (night, "UTC", "2026-11-24T05:59:59Z"),
            inside("2026-11-23T22:00:00Z", "2026-11-24T06:00:00Z"),
        );
        check(
            (night, "UTC", "2026-11-24T06:00:00Z"),
            outside("2026-11-24T22:00:00Z"),
        );
        check(
            ("02:00-00:00", "UTC", "2026-11-23T23:59:59Z"),
            inside("2026-11-23T02:00:00Z", "2026-11-24T00:00:00Z"),
        );
        for all_day in ["00:00-24:00", "05:00-05:00"] {
            check(
                (all_day, "UTC", "2026-11-23T10:00:00Z"),
                Expected {
                    contains: true,
                    next_start: "2026-11-23T10:00:00Z",
                    current_end: None,
                },
            );
        }
    }

    #[test]
    fn windows_in_paris() {
        let day = "02:00-14:00";
        // Winter (UTC+1) and summer (UTC+2).
        check(
            (day, "Europe/Paris", "2026-01-15T01:00:00Z"),
            inside("2026-01-15T01:00:00Z", "2026-01-15T13:00:00Z"),
        );
        check(
            (day, "Europe/Paris", "2026-01-15T00:59:59Z"),
            outside("2026-01-15T01:00:00Z"),
        );
        check(
            (day, "Europe/Paris", "2026-07-15T11:00:00Z"),
            inside("2026-07-15T00:00:00Z", "2026-07-15T12:00:00Z"),
        );
        // Spring forward, 29 March 2026 at 01:00Z: 02:00 local does not exist, the window
        // opens at 03:00 CEST (the same instant) and closes at 14:00 CEST.
        check(
            (day, "Europe/Paris", "2026-03-29T00:30:00Z"),
            outside("2026-03-29T01:00:00Z"),
        );
        check(
            (day, "Europe/Paris", "2026-03-29T01:00:00Z"),
            inside("2026-03-29T01:00:00Z", "2026-03-29T12:00:00Z"),
        );
        check(
            (day, "Europe/Paris", "2026-03-28T13:00:00Z"),
            outside("2026-03-29T01:00:00Z"),
        );
        // A window inside the skipped hour is shifted with it; one whose shifted start falls
        // after its end does not open that day.
        check(
            ("02:10-02:50", "Europe/Paris", "2026-03-29T00:00:00Z"),
            outside("2026-03-29T01:10:00Z"),
        );
        check(
            ("02:10-02:50", "Europe/Paris", "2026-03-29T01:49:59Z"),
            inside("2026-03-29T01:10:00Z", "2026-03-29T01:50:00Z"),
        );
        check(
            ("02:30-03:00", "Europe/Paris", "2026-03-29T00:00:00Z"),
            outside("2026-03-30T00:30:00Z"),
        );
        // Fall back, 25 October 2026 at 01:00Z: 02:00 local happens twice, the window opens at
        // the first (CEST) and closes at 14:00 CET, 13 hours later.
        check(
            (day, "Europe/Paris", "2026-10-24T23:59:59Z"),
            outside("2026-10-25T00:00:00Z"),
        );
        check(
            (day, "Europe/Paris", "2026-10-25T01:30:00Z"),
            inside("2026-10-25T00:00:00Z", "2026-10-25T13:00:00Z"),
        );
        check(
            (day, "Europe/Paris", "2026-10-25T13:00:00Z"),
            outside("2026-10-26T01:00:00Z"),
        );
        // Crossing midnight over a DST change.
        check(
            ("22:00-06:00", "Europe/Paris", "2026-03-29T02:00:00Z"),
            inside("2026-03-28T21:00:00Z", "2026-03-29T04:00:00Z"),
        );
    }

    #[test]
    fn windows_never_panic() {
        let hand_built = [
            window(120, 840, "Nowhere/Else"),
            window(5000, 9000, "UTC"),
            window(u16::MAX, 0, "UTC"),
        ];
        for fill_window in hand_built {
            for now in [i64::MIN, -1, 0, 1_800_000_000, i64::MAX] {
                let _ = fill_window.contains(now);
                let _ = fill_window.next_start(now);
                let _ = fill_window.current_end(now);
            }
        }
        let unknown_zone = window(120, 840, "Nowhere/Else");
        assert_eq!(
            unknown_zone.next_start(at("2026-11-23T00:00:00Z")),
            at("2026-11-23T02:00:00Z")
        );
        let utc = window(120, 840, "UTC");
        assert!(!utc.contains(i64::MAX));
        assert_eq!(utc.next_start(i64::MAX), i64::MAX);
        assert_eq!(utc.current_end(i64::MIN), None);
    }

    fn check_delay(input: (u64, u64), expected: u64) {
        let (seed, max_delay_s) = input;
        assert_eq!(start_delay_s(seed, max_delay_s), expected, "{input:?}");
    }

    #[test]
    fn start_delays() {
        check_delay((0, 0), 0);
        check_delay((u64::MAX, 0), 0);
        check_delay((42, u64::MAX), split_mix64(42));
        check_delay((42, 3600), split_mix64(42) % 3601);
        let delays: Vec<u64> = (0..1000).map(|seed| start_delay_s(seed, 3600)).collect();
        assert!(delays.iter().all(|delay| *delay <= 3600));
        let mut distinct = delays.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 850, "{} distinct delays", distinct.len());
        let early = delays.iter().filter(|delay| **delay < 1800).count();
        assert!(
            (400..600).contains(&early),
            "{early} of 1000 in the first half"
        );
    }
}
