//! Newtype identifiers. Ids become path components, cgroup names and
//! container ids, so they are validated once, at the edge, and carried typed.

/// Longest id accepted; cgroup and netns names stay well below kernel limits.
pub const MAX_ID_LEN: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} {value:?} is longer than {MAX_ID_LEN} characters")]
    TooLong { kind: &'static str, value: String },
    #[error(
        "{kind} {value:?} must start with a letter or digit and contain only letters, digits, '.', '_' and '-'"
    )]
    BadChars { kind: &'static str, value: String },
}

pub(crate) fn check(kind: &'static str, value: &str) -> Result<(), IdError> {
    let Some(first) = value.chars().next() else {
        return Err(IdError::Empty { kind });
    };
    if value.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            kind,
            value: value.to_owned(),
        });
    }
    // The first character being alphanumeric rules out "." and ".." and
    // hidden files; the rest cannot contain '/', so an id is one path component.
    let ok = first.is_ascii_alphanumeric()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(IdError::BadChars {
            kind,
            value: value.to_owned(),
        })
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, ::serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, $crate::ids::IdError> {
                let value = value.into();
                $crate::ids::check($kind, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::ids::IdError;
            fn from_str(s: &str) -> Result<Self, $crate::ids::IdError> {
                Self::new(s)
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as ::serde::Deserialize>::deserialize(d)?;
                Self::new(s).map_err(::serde::de::Error::custom)
            }
        }
    };
}
// Also used for the wire's labels (zones, tags, brain ids), which follow
// the same rules.
pub(crate) use id_type;

id_type!(
    /// An application instance (an LRP instance or a task) on a cell.
    InstanceId,
    "instance id"
);
id_type!(
    /// A tenant (an organisation/space owning apps).
    TenantId,
    "tenant"
);
id_type!(
    /// An application (a desired LRP or a task family).
    AppId,
    "app"
);
id_type!(
    /// A cell (one node running an agent).
    CellId,
    "cell id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_ids() {
        for ok in ["web-0", "a", "A.b_c-9", &"x".repeat(MAX_ID_LEN)] {
            assert!(InstanceId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_path_tricks_and_junk() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            ".hidden",
            "-x",
            "a b",
            "é",
            &"x".repeat(64),
        ] {
            assert!(InstanceId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deserialize_validates() {
        let r: Result<TenantId, _> = serde_json::from_str("\"../etc\"");
        assert!(r.is_err());
        let t: TenantId = serde_json::from_str("\"acme\"").unwrap();
        assert_eq!(t.as_str(), "acme");
    }
}
