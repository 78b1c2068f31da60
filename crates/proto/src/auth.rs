//! Bearer-secret authentication shared by every mcfs gRPC service.
//!
//! The cluster secret is a file's contents (trailing whitespace ignored). Clients
//! attach `authorization: Bearer <secret>`; servers compare in constant time. The
//! secret travels in clear text: mcfs services listen on loopback or a private
//! cluster network (see docs/LOCKING.md, "Security").

use std::path::Path;
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

/// A loaded cluster secret.
#[derive(Clone)]
pub struct Secret(std::sync::Arc<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Read a secret file. Empty files and unreadable files are errors.
    pub fn from_file(path: &Path) -> Result<Secret, String> {
        let raw = std::fs::read(path)
            .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
        let trimmed = String::from_utf8(raw)
            .map_err(|_| format!("secret file {} is not UTF-8 text", path.display()))?
            .trim_end()
            .to_string();
        Secret::new(trimmed).map_err(|e| format!("secret file {}: {e}", path.display()))
    }

    /// Build from a string (tests, generated configs).
    pub fn new(s: impl Into<String>) -> Result<Secret, String> {
        let s = s.into();
        if s.is_empty() {
            return Err("the secret is empty".into());
        }
        if s.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
            return Err("the secret must be printable ASCII without spaces".into());
        }
        Ok(Secret(std::sync::Arc::new(s.into_bytes())))
    }

    /// Check an incoming request's `authorization` header in constant time.
    pub fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(v) = req.metadata().get("authorization") else {
            return Err(Status::unauthenticated("missing authorization (cluster secret)"));
        };
        let got = v.as_bytes().strip_prefix(b"Bearer ").unwrap_or(b"");
        if got.len() == self.0.len() && bool::from(got.ct_eq(&self.0)) {
            Ok(())
        } else {
            Err(Status::unauthenticated("wrong cluster secret"))
        }
    }

    /// Attach the secret to an outgoing request.
    pub fn attach<T>(&self, mut req: Request<T>) -> Request<T> {
        let mut v = b"Bearer ".to_vec();
        v.extend_from_slice(&self.0);
        if let Ok(val) = MetadataValue::try_from(v.as_slice()) {
            req.metadata_mut().insert("authorization", val);
        }
        req
    }

    /// A tonic interceptor that attaches the secret to every call of a client.
    pub fn interceptor(&self) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
        let s = self.clone();
        move |req| Ok(s.attach(req))
    }

    /// A tonic interceptor that checks every incoming call.
    pub fn checker(&self) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
        let s = self.clone();
        move |req| {
            s.check(&req)?;
            Ok(req)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_accepts_right_and_refuses_wrong() {
        let s = Secret::new("abc123").unwrap();
        assert!(s.check(&s.attach(Request::new(()))).is_ok());
        let other = Secret::new("abc124").unwrap();
        assert_eq!(s.check(&other.attach(Request::new(()))).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(s.check(&Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(Secret::new("").is_err());
        assert!(Secret::new("a b").is_err());
    }
}
