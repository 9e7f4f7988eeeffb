//! `templates`: a user's named recipes for sandboxes (image, sizes, env,
//! secrets, init, keep_hot), kept as the API's `CreateTemplate` JSON.
//! Names are unique per owner; rows go with their user by foreign key.

use rusqlite::{params, Connection, OptionalExtension};

use super::{new_id, now_ms, Result, StoreError};
use crate::api_types::CreateTemplate;

/// Most templates one user may keep.
pub const MAX_PER_USER: u32 = 50;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRow {
    pub id: String,
    pub owner: String,
    pub spec: CreateTemplate,
    /// Unix milliseconds.
    pub created_at: i64,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, String, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

fn parse((id, owner, spec, created_at): (String, String, String, i64)) -> Result<TemplateRow> {
    let spec = serde_json::from_str(&spec).map_err(|source| StoreError::Json {
        column: "templates.spec",
        source,
    })?;
    Ok(TemplateRow {
        id,
        owner,
        spec,
        created_at,
    })
}

/// Adds a template unless the name is taken ([`StoreError::Conflict`]) or
/// the owner has [`MAX_PER_USER`] ([`StoreError::Limit`]). One transaction.
pub fn insert(c: &mut Connection, owner: &str, spec: &CreateTemplate) -> Result<TemplateRow> {
    let tx = c.transaction()?;
    let have: u32 = tx
        .prepare_cached("SELECT COUNT(*) FROM templates WHERE owner = ?1")?
        .query_row([owner], |r| r.get(0))?;
    if have >= MAX_PER_USER {
        return Err(StoreError::Limit(format!(
            "at most {MAX_PER_USER} templates per user"
        )));
    }
    let t = TemplateRow {
        id: new_id("tpl-"),
        owner: owner.to_owned(),
        spec: spec.clone(),
        created_at: now_ms(),
    };
    let json = serde_json::to_string(spec).map_err(|source| StoreError::Json {
        column: "templates.spec",
        source,
    })?;
    let r = tx
        .prepare_cached(
            "INSERT INTO templates (id, owner, name, image, spec, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            t.id,
            t.owner,
            spec.name,
            spec.image,
            json,
            t.created_at
        ]);
    if let Err(e) = r {
        return Err(super::unique_as_conflict(e, || {
            format!("a template named '{}' exists", spec.name)
        }));
    }
    tx.commit()?;
    Ok(t)
}

pub fn get(c: &Connection, owner: &str, name: &str) -> Result<Option<TemplateRow>> {
    c.prepare_cached(
        "SELECT id, owner, spec, created_at FROM templates WHERE owner = ?1 AND name = ?2",
    )?
    .query_row([owner, name], row)
    .optional()?
    .map(parse)
    .transpose()
}

/// The owner's templates by name; all users' when `owner` is `None`.
pub fn list(c: &Connection, owner: Option<&str>) -> Result<Vec<TemplateRow>> {
    let mut st = c.prepare_cached(
        "SELECT id, owner, spec, created_at FROM templates \
         WHERE ?1 IS NULL OR owner = ?1 ORDER BY owner, name",
    )?;
    let rows = st.query_map([owner], row)?;
    rows.map(|r| parse(r?)).collect()
}

/// Whether one of the owner's templates uses the image `name`.
pub fn uses_image(c: &Connection, owner: &str, name: &str) -> Result<bool> {
    Ok(
        c.prepare_cached("SELECT 1 FROM templates WHERE owner = ?1 AND image = ?2")?
            .query_row([owner, name], |_| Ok(()))
            .optional()?
            .is_some(),
    )
}

/// Removes a template; `false` if there was none.
pub fn delete(c: &Connection, owner: &str, name: &str) -> Result<bool> {
    Ok(
        c.prepare_cached("DELETE FROM templates WHERE owner = ?1 AND name = ?2")?
            .execute([owner, name])?
            > 0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> CreateTemplate {
        CreateTemplate {
            name: name.into(),
            image: Some("py:3".into()),
            init: Some("echo hi > /tmp/x".into()),
            ..Default::default()
        }
    }

    #[test]
    fn insert_get_list_delete() {
        let (store, _dir) = crate::store::testutil::store();
        store
            .with(|c| {
                let owner = crate::store::testutil::user(c, "ann");
                let u = crate::store::users::get(c, &owner)?.unwrap();
                let t = insert(c, &u.id, &spec("web"))?;
                assert_eq!(get(c, &u.id, "web")?.unwrap(), t);
                assert!(matches!(
                    insert(c, &u.id, &spec("web")),
                    Err(StoreError::Conflict(_))
                ));
                assert!(uses_image(c, &u.id, "py:3")?);
                assert!(!uses_image(c, &u.id, "other")?);
                assert_eq!(list(c, Some(&u.id))?.len(), 1);
                assert_eq!(list(c, None)?.len(), 1);
                assert!(delete(c, &u.id, "web")?);
                assert!(!delete(c, &u.id, "web")?);
                assert!(get(c, &u.id, "web")?.is_none());
                Ok(())
            })
            .unwrap();
    }
}
