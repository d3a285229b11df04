//! Token buckets for byte-rate limits (per session from the ticket, and relay-wide from the
//! config). Sans-I/O: the caller passes `now` in microseconds from any fixed origin.
//!
//! What it does not do: sleep or read a clock.

/// A token bucket: `rate` bytes per second, holding at most `burst` bytes.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    last_us: u64,
}

impl TokenBucket {
    /// A full bucket. The burst is a tenth of a second of traffic, at least 64 KiB.
    pub fn new(rate: u64, now_us: u64) -> Self {
        let burst = (rate / 10).max(64 * 1024);
        Self {
            rate,
            burst,
            tokens: burst,
            last_us: now_us,
        }
    }

    fn refill(&mut self, now_us: u64) {
        let dt = now_us.saturating_sub(self.last_us);
        if dt == 0 {
            return;
        }
        let add = (u128::from(dt) * u128::from(self.rate) / 1_000_000) as u64;
        if add > 0 {
            self.tokens = self.tokens.saturating_add(add).min(self.burst);
            self.last_us = now_us;
        }
    }

    /// Takes up to `want` bytes; returns how many were granted (0 if the bucket is empty).
    pub fn take_up_to(&mut self, want: u64, now_us: u64) -> u64 {
        self.refill(now_us);
        let n = want.min(self.tokens);
        self.tokens -= n;
        n
    }

    /// Takes exactly `n` bytes if available.
    pub fn take_exact(&mut self, n: u64, now_us: u64) -> bool {
        self.refill(now_us);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Gives back bytes granted but not used.
    pub fn give_back(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_add(n).min(self.burst);
    }

    /// Microseconds until at least `n` bytes (capped at the burst) are available.
    pub fn wait_us(&self, n: u64) -> u64 {
        let n = n.min(self.burst);
        if self.tokens >= n || self.rate == 0 {
            return 0;
        }
        ((n - self.tokens) as u128 * 1_000_000 / u128::from(self.rate)) as u64 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_rate() {
        let mut b = TokenBucket::new(1_000_000, 0);
        assert_eq!(b.take_up_to(10_000_000, 0), 100_000);
        assert_eq!(b.take_up_to(1, 0), 0);
        assert!(b.wait_us(1000) > 0);
        assert_eq!(b.take_up_to(10_000_000, 50_000), 50_000);
        assert!(!b.take_exact(1, 50_000));
        assert!(b.take_exact(1000, 51_000));
        // Over one simulated second, at most rate + burst bytes pass.
        let mut total = 0;
        for t in 0..=1000u64 {
            total += b.take_up_to(1 << 20, 51_000 + t * 1000);
        }
        assert!(total <= 1_000_000 + 100_000, "{total}");
    }
}
