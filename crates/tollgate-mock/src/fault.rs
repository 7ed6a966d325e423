//! Faults the mock can inject, for the whole process or one request.

use crate::Error;
use std::str::FromStr;
use std::time::Duration;

/// The request header that injects a fault into one request. Only the mock
/// reads it; the gateway passes `x-mock-*` headers through untouched.
pub const FAULT_HEADER: &str = "x-mock-fault";

/// One injected misbehaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// An HTTP 5xx with OpenAI's `server_error` body.
    Status(u16),
    /// A 429 as if over the RPM limit, retryable after the given delay.
    RateLimited(Duration),
    /// 529 with an `overloaded_error` body.
    Overloaded,
    /// Accept the request and never answer.
    Hang,
    /// Answer correctly but very slowly: one piece per given delay.
    Trickle(Duration),
    /// Reset the TCP connection without answering.
    Reset,
    /// A 200 whose JSON body stops half-way.
    Truncated,
    /// A 200 whose body is not JSON at all.
    Malformed,
    /// A stream that breaks off after this many content chunks.
    Cut(u32),
    /// 429 `insufficient_quota`: billing, never clears with time.
    InsufficientQuota,
}

impl FromStr for Fault {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        let (name, arg) = s.split_once(':').map_or((s, None), |(n, a)| (n, Some(a)));
        let delay = |default: Duration| -> Result<Duration, Error> {
            arg.map_or(Ok(default), |a| {
                humantime::parse_duration(a).map_err(|_| Error::UnknownFault(s.to_owned()))
            })
        };
        Ok(match name {
            "500" | "502" | "503" => Fault::Status(name.parse().unwrap_or(500)),
            "429" => Fault::RateLimited(delay(Duration::from_secs(1))?),
            "overload" | "529" => Fault::Overloaded,
            "hang" => Fault::Hang,
            "trickle" => Fault::Trickle(delay(Duration::from_millis(500))?),
            "reset" => Fault::Reset,
            "truncated" => Fault::Truncated,
            "malformed" => Fault::Malformed,
            "cut" => Fault::Cut(
                arg.map_or(Ok(3), str::parse)
                    .map_err(|_| Error::UnknownFault(s.to_owned()))?,
            ),
            "insufficient_quota" => Fault::InsufficientQuota,
            _ => return Err(Error::UnknownFault(s.to_owned())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_fault() {
        assert_eq!("503".parse::<Fault>().ok(), Some(Fault::Status(503)));
        assert_eq!("cut:5".parse::<Fault>().ok(), Some(Fault::Cut(5)));
        assert_eq!(
            "429:1500ms".parse::<Fault>().ok(),
            Some(Fault::RateLimited(Duration::from_millis(1500)))
        );
        assert_eq!("hang".parse::<Fault>().ok(), Some(Fault::Hang));
        assert!("teapot".parse::<Fault>().is_err());
        assert!("cut:x".parse::<Fault>().is_err());
    }
}
