//! OpenAPI schemas for the string forms the validators check, so that the
//! document says what a handler accepts (schemathesis' positive and
//! negative data checks hold the two to each other, tests/api_fuzz.rs).
//! Each is built from the same constants as its validator.

use std::borrow::Cow;

use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;

use crate::{
    EVENT_TYPES, MAX_ARGS, MAX_ENV_ENTRIES, MAX_ENV_VALUE, MAX_IMAGE_REF, MAX_LABELS,
    MAX_LABEL_VALUE, MAX_NAME_LEN, MAX_PATH, MAX_SECRET_NAME_LEN, MAX_TIMEOUT_SEC,
};

fn string(pattern: String, min: usize, max: usize, what: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(pattern))
        .min_length(Some(min))
        .max_length(Some(max))
        .description(Some(what))
        .into()
}

/// One guest path component that is not `..` (nor contains `/` or NUL).
/// JSON Schema counts characters, the kernel bytes: a component of more
/// than 255 bytes in fewer characters passes the pattern and is refused.
const COMPONENT: &str = r"(?:[^/\x00]{3,255}|[^/.\x00][^/\x00]|\.[^/.\x00]|[^/\x00]?)";

/// The regular expression of [`crate::validate_name`].
pub fn name_pattern() -> String {
    format!("^[a-z0-9][a-z0-9-]{{0,{}}}$", MAX_NAME_LEN - 1)
}

/// The regular expression of [`crate::validate_guest_path`].
pub fn guest_path_pattern() -> String {
    format!("^/{COMPONENT}(?:/{COMPONENT})*$")
}

/// The regular expression of `GET /events?type=`: kinds, comma-separated.
pub fn event_types_pattern() -> String {
    let kind = format!("(?:{})", EVENT_TYPES.join("|"));
    format!("^(?:{kind}(?:,{kind})*)?$")
}

/// A label key (see [`crate::validate_labels`]).
pub const LABEL_KEY_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$";
/// An environment variable's name (see [`crate::validate_env_key`]).
pub const ENV_KEY_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]{0,255}$";
/// A string without a NUL byte.
pub const NO_NUL_PATTERN: &str = r"^[^\x00]*$";
/// A string without control characters (Unicode's Cc: what
/// `char::is_control` means).
pub const NO_CONTROL_PATTERN: &str = r"^[^\x00-\x1f\x7f-\x9f]*$";

fn map(keys: &str, values: ObjectBuilder, max_entries: usize, nullable: bool) -> ObjectBuilder {
    let ty = if nullable {
        utoipa::openapi::schema::SchemaType::from_iter([Type::Object, Type::Null])
    } else {
        utoipa::openapi::schema::SchemaType::new(Type::Object)
    };
    ObjectBuilder::new()
        .schema_type(ty)
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(keys)),
        ))
        .additional_properties(Some(values))
        .max_properties(Some(max_entries))
}

fn labels_map(nullable: bool) -> ObjectBuilder {
    map(
        LABEL_KEY_PATTERN,
        ObjectBuilder::new()
            .schema_type(Type::String)
            .max_length(Some(MAX_LABEL_VALUE))
            .pattern(Some(NO_CONTROL_PATTERN)),
        MAX_LABELS,
        nullable,
    )
    .description(Some(
        "Labels: keys of letters, digits, '.', '_', '/', '-'; values without control characters",
    ))
}

/// Labels as [`crate::validate_labels`] takes them.
pub fn labels() -> ObjectBuilder {
    labels_map(false)
}

/// Labels, or `null` for none given.
pub fn labels_or_null() -> ObjectBuilder {
    labels_map(true)
}

/// An environment as [`crate::validate_env`] takes it (values are bounded
/// in bytes; the schema's bound counts characters).
pub fn env() -> ObjectBuilder {
    map(
        ENV_KEY_PATTERN,
        ObjectBuilder::new()
            .schema_type(Type::String)
            .max_length(Some(MAX_ENV_VALUE))
            .pattern(Some(NO_NUL_PATTERN)),
        MAX_ENV_ENTRIES,
        false,
    )
}

/// Secrets' names, each once.
pub fn secret_names() -> ArrayBuilder {
    ArrayBuilder::new()
        .items(utoipa::openapi::Ref::from_schema_name("SecretName"))
        .max_items(Some(MAX_ENV_ENTRIES))
        .unique_items(true)
}

/// An exec's timeout in seconds.
pub fn timeout_sec() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            Type::Integer,
            Type::Null,
        ]))
        .minimum(Some(1))
        .maximum(Some(MAX_TIMEOUT_SEC))
}

/// `ExecRequest`'s rule across fields: a detached command takes no stdin
/// (`detach` absent or false, or `stdin` absent or null). The daemon's
/// document puts it beside the derived schema (`allOf`).
pub fn detached_takes_no_stdin() -> Schema {
    use utoipa::openapi::schema::AnyOfBuilder;
    let only = |field: &str, value: ObjectBuilder| ObjectBuilder::new().property(field, value);
    AnyOfBuilder::new()
        .item(only(
            "detach",
            ObjectBuilder::new()
                .schema_type(Type::Boolean)
                .enum_values(Some([false])),
        ))
        .item(only("stdin", ObjectBuilder::new().schema_type(Type::Null)))
        .build()
        .into()
}

/// `PullImage.auth`: `{username, password}` or `{token}`, nothing else
/// (a derived schema of the untagged enum would leave its variants open),
/// or `null`.
pub fn registry_auth() -> Schema {
    let closed = |fields: &[&str]| {
        let mut o = ObjectBuilder::new()
            .schema_type(Type::Object)
            .additional_properties(Some(
                utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
            ));
        for f in fields {
            o = o
                .property(*f, ObjectBuilder::new().schema_type(Type::String))
                .required(*f);
        }
        o
    };
    let not_empty = || {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
    };
    utoipa::openapi::schema::OneOfBuilder::new()
        .item(
            closed(&["password"])
                .property("username", not_empty())
                .required("username"),
        )
        .item(closed(&[]).property("token", not_empty()).required("token"))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(
            "Registry credentials: {username, password} or {token}",
        ))
        .build()
        .into()
}

/// A command line as [`crate::validate_cmd`] takes it: a program (not
/// empty), then arguments, none with a NUL byte. (The bound on all its
/// bytes together, `MAX_CMD_BYTES`, has no JSON Schema form.)
pub fn command() -> ArrayBuilder {
    let no_nul = || {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(NO_NUL_PATTERN))
    };
    ArrayBuilder::new()
        .prefix_items([no_nul().min_length(Some(1))])
        .items(no_nul())
        .min_items(Some(1))
        .max_items(Some(MAX_ARGS))
}

/// A marker type whose OpenAPI schema is a constrained string.
macro_rules! string_schema {
    ($(#[$doc:meta])* $ty:ident, $pattern:expr, $min:expr, $max:expr, $what:expr) => {
        $(#[$doc])*
        pub struct $ty;

        impl utoipa::PartialSchema for $ty {
            fn schema() -> RefOr<Schema> {
                string($pattern, $min, $max, $what)
            }
        }

        impl utoipa::ToSchema for $ty {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($ty))
            }
        }
    };
}

string_schema!(
    /// A sandbox, checkpoint, template or volume name.
    Name,
    name_pattern(),
    1,
    MAX_NAME_LEN,
    "Lower-case letters, digits and '-', starting with a letter or digit"
);

string_schema!(
    /// An absolute guest path without `..` components.
    GuestPath,
    guest_path_pattern(),
    1,
    MAX_PATH,
    "An absolute guest path without '..' components"
);

string_schema!(
    /// Event kinds, comma-separated (empty: all).
    EventTypes,
    event_types_pattern(),
    0,
    EVENT_TYPES.iter().map(|k| k.len() + 1).sum(),
    "Event kinds, comma-separated"
);

string_schema!(
    /// A published port's alias (one DNS label).
    Alias,
    "^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$".to_string(),
    1,
    63,
    "Lower-case letters, digits and '-', not at either end"
);

string_schema!(
    /// A secret's name.
    SecretName,
    format!("^[A-Z_][A-Z0-9_]{{0,{}}}$", MAX_SECRET_NAME_LEN - 1),
    1,
    MAX_SECRET_NAME_LEN,
    "Upper-case letters, digits and '_', not starting with a digit"
);

string_schema!(
    /// A name in the image catalogue.
    ImageName,
    "^[a-z0-9][a-z0-9._:-]{0,127}$".to_string(),
    1,
    128,
    "1 to 128 of a-z, 0-9, '.', '_', ':' and '-', starting with a letter or digit"
);

string_schema!(
    /// A catalogue name or a registry reference.
    ImageRef,
    format!("^[A-Za-z0-9][A-Za-z0-9._:/@-]{{0,{}}}$", MAX_IMAGE_REF - 1),
    1,
    MAX_IMAGE_REF,
    "A catalogue name or [host[:port]/]path[:tag][@digest]"
);

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, s: &str) -> bool {
        regex::Regex::new(pattern).expect("pattern").is_match(s)
    }

    #[test]
    fn the_name_pattern_is_the_validator() {
        let long = "a".repeat(MAX_NAME_LEN);
        let too_long = "a".repeat(MAX_NAME_LEN + 1);
        for s in [
            "a", "dev-1", "0x", &long, "", "-a", "A", "a_b", "é", &too_long,
        ] {
            assert_eq!(
                matches(&name_pattern(), s),
                crate::validate_name("n", s).is_ok(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn the_path_pattern_is_the_validator() {
        for s in [
            "/", "/a", "/a/b", "/.", "/.a", "/a.", "/...", "/a/..b", "//x", "", "a", "/..",
            "/a/../b", "/a/..", "/a\0b", "../x",
        ] {
            assert_eq!(
                matches(&guest_path_pattern(), s),
                crate::validate_guest_path("p", s).is_ok(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn the_other_patterns_are_their_validators() {
        use utoipa::PartialSchema;
        let pattern = |s: RefOr<Schema>| match s {
            RefOr::T(Schema::Object(o)) => o.pattern.expect("a pattern"),
            _ => panic!("not an object schema"),
        };
        let long = "A".repeat(MAX_SECRET_NAME_LEN + 1);
        for s in ["API_KEY", "_X", "X1", "", "1X", "api", "A-B", &long] {
            let ok = crate::validate_secret_name(s).is_ok();
            assert_eq!(matches(&pattern(SecretName::schema()), s), ok, "{s:?}");
        }
        for s in [
            "python:3.12",
            "my-app",
            "a",
            "",
            ".a",
            "A",
            "a/b",
            &"a".repeat(129),
        ] {
            let ok = crate::validate_image_name("n", s).is_ok();
            assert_eq!(matches(&pattern(ImageName::schema()), s), ok, "{s:?}");
        }
        for s in [
            "docker.io/library/alpine:3@sha256:ab",
            "a",
            "",
            "/a",
            "a b",
            &"a".repeat(MAX_IMAGE_REF + 1),
        ] {
            let ok = crate::validate_image_ref("r", s).is_ok();
            assert_eq!(matches(&pattern(ImageRef::schema()), s), ok, "{s:?}");
        }
    }

    #[test]
    fn the_event_types_pattern_is_the_parser() {
        for s in [
            "",
            "wake",
            "wake,cold",
            "wake,",
            ",wake",
            "nope",
            "wake,nope",
            "wakes",
        ] {
            assert_eq!(
                matches(&event_types_pattern(), s),
                crate::parse_event_types_exact(s).is_ok(),
                "{s:?}"
            );
        }
    }
}
