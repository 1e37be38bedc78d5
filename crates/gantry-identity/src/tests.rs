use super::*;

fn config(issuer: &str) -> IdentityConfig {
    IdentityConfig {
        issuer: issuer.into(),
        algorithm: Alg::EdDSA,
        access_ttl: 300,
        refresh_ttl: 3600,
        workload_ttl: 120,
        rotate_every: 0,
        propagation: 0,
        session_ttl: 3600,
        cert_ttl: 3600,
        sessions_redis: None,
        keyring: Arc::new(gantry_secrets::Keyring::new(&[9u8; 32], &[])),
        mtls: Default::default(),
        audience: "gantry".into(),
        calls: CallPolicy::default(),
        external: Vec::new(),
    }
}

async fn open() -> (tempfile::TempDir, Arc<Identity>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(gantry_store::RedbStore::open(dir.path()).expect("store"));
    let id = Identity::open(store, config("http://issuer.test"), &Metrics::new())
        .await
        .expect("open");
    (dir, id)
}

fn new_client(id: &str, kind: ClientKind, grants: &[&str]) -> NewClient {
    NewClient {
        id: id.into(),
        kind,
        grant_types: grants.iter().map(|s| s.to_string()).collect(),
        redirect_uris: vec!["http://app.test/cb".into()],
        scopes: vec!["orders:read".into(), "orders:write".into()],
        roles: vec![],
        audiences: vec![],
    }
}

#[tokio::test]
async fn client_credentials_yield_a_token_the_material_verifies() {
    let (_d, id) = open().await;
    let (c, secret) = id
        .create_client(new_client("billing", ClientKind::Confidential, &[]))
        .await
        .expect("create");
    let secret = secret.expect("a confidential client gets a secret");
    assert!(c.secret_sha256.is_some());
    let c = id
        .authenticate_client("billing", Some(&secret))
        .await
        .expect("auth");
    assert!(id
        .authenticate_client("billing", Some("wrong"))
        .await
        .is_err());
    assert!(id.authenticate_client("billing", None).await.is_err());
    let t = id
        .client_credentials(&c, Some("orders:read"))
        .await
        .expect("token");
    assert_eq!(t.scope, "orders:read");
    assert!(t.refresh_token.is_none());
    let v = id.verify(&t.access_token).expect("verifies");
    assert_eq!(v.subject, "billing");
    assert_eq!(v.kind, gantry_authn::Kind::Client);
    let e = id
        .client_credentials(&c, Some("admin"))
        .await
        .expect_err("not allowed");
    assert_eq!(e.error, "invalid_scope");
}

#[tokio::test]
async fn a_reused_refresh_token_revokes_its_family() {
    let (_d, id) = open().await;
    id.create_user("alice", "correct horse", vec!["viewer".into()])
        .await
        .expect("user");
    let (c, _) = id
        .create_client(new_client(
            "spa",
            ClientKind::Public,
            &["password", "refresh_token"],
        ))
        .await
        .expect("client");
    assert!(id
        .password(&c, "alice", "wrong password", None)
        .await
        .is_err());
    let t1 = id
        .password(&c, "alice", "correct horse", Some("openid orders:read"))
        .await
        .expect("login");
    assert!(t1.id_token.is_some());
    let r1 = t1.refresh_token.clone().expect("refresh token");
    let t2 = id.refresh(&c, &r1, None).await.expect("rotate");
    let r2 = t2.refresh_token.clone().expect("new refresh token");
    assert_ne!(r1, r2);
    assert!(id.verify(&t2.access_token).is_ok());
    // r1 again: a replay. The family (r2, and the access tokens) is revoked.
    let e = id.refresh(&c, &r1, None).await.expect_err("reuse");
    assert_eq!(e.error, "invalid_grant");
    assert!(id.refresh(&c, &r2, None).await.is_err());
    assert_eq!(
        id.verify(&t2.access_token).err(),
        Some(gantry_authn::Denial::Revoked)
    );
    assert_eq!(
        id.verify(&t1.access_token).err(),
        Some(gantry_authn::Denial::Revoked)
    );
}

#[tokio::test]
async fn rotation_keeps_old_tokens_valid_and_signs_with_the_new_key() {
    let (_d, id) = open().await;
    let (c, s) = id
        .create_client(new_client("m2m", ClientKind::Confidential, &[]))
        .await
        .expect("client");
    let _ = s;
    let before = id.client_credentials(&c, None).await.expect("token");
    let (_, signing_before) = id.keys();
    let new = id.rotate_now(0).await.expect("rotate");
    let (keys, signing) = id.keys();
    assert_eq!(signing.as_deref(), Some(new.kid.as_str()));
    assert_ne!(signing, signing_before);
    assert_eq!(keys.len(), 2, "the old key stays published");
    assert!(id.verify(&before.access_token).is_ok());
    let after = id.client_credentials(&c, None).await.expect("token");
    let h = jsonwebtoken::decode_header(&after.access_token).expect("header");
    assert_eq!(h.kid.as_deref(), Some(new.kid.as_str()));
    // With a propagation delay, the new key is published first and signs later.
    let pending = id.rotate_now(3600).await.expect("rotate");
    let (keys, signing) = id.keys();
    assert!(keys.iter().any(|k| k.kid == pending.kid));
    assert_eq!(signing.as_deref(), Some(new.kid.as_str()));
    assert!(id.current_material().issuers[0]
        .keys
        .get(&pending.kid)
        .is_some());
}

#[tokio::test]
async fn api_keys_and_workload_tokens_reach_the_material() {
    let (_d, id) = open().await;
    id.create_client(new_client("cron", ClientKind::Confidential, &[]))
        .await
        .expect("client");
    let (info, key) = id
        .create_api_key("cron", vec!["orders:read".into()])
        .await
        .expect("key");
    let m = id.current_material();
    let who = m.api_key(&key).expect("known");
    assert_eq!(who.client_id.as_deref(), Some("cron"));
    assert_eq!(who.scopes, ["orders:read"]);
    assert!(m.api_key("gk_nope").is_err());
    id.delete_api_key(&info.id).await.expect("delete");
    assert!(id.current_material().api_key(&key).is_err());

    let w = id
        .workload_token("orders", "1.2.3", "orders-1")
        .expect("token");
    let v = id.verify(&w.token).expect("verifies");
    assert_eq!(v.service.as_deref(), Some("orders"));
    assert_eq!(v.kind, gantry_authn::Kind::Workload);
    id.revoke_jti(&w.jti, w.expires).await.expect("revoke");
    assert_eq!(
        id.verify(&w.token).err(),
        Some(gantry_authn::Denial::Revoked)
    );
}

#[tokio::test]
async fn bad_directory_input_is_refused_with_a_reason() {
    let (_d, id) = open().await;
    let e = id
        .create_client(new_client("bad id!", ClientKind::Confidential, &[]))
        .await
        .expect_err("bad id");
    assert!(e.to_string().contains("client id"), "{e}");
    let e = id
        .create_client(new_client("p", ClientKind::Public, &["client_credentials"]))
        .await
        .expect_err("public cc");
    assert!(e.to_string().contains("public"), "{e}");
    let e = id
        .create_user("bob", "short", vec![])
        .await
        .expect_err("short password");
    assert!(e.to_string().contains("password"), "{e}");
    let e = id
        .create_user("bob", "long enough", vec!["wizard".into()])
        .await
        .expect_err("unknown role");
    assert!(e.to_string().contains("unknown role"), "{e}");
    id.create_user("bob", "long enough", vec![])
        .await
        .expect("bob");
    assert!(matches!(
        id.create_user("bob", "long enough", vec![]).await,
        Err(IdentityError::Exists(_))
    ));
    // Names that cannot be store keys are unknown, not store errors.
    let not_store = |e: IdentityError| !matches!(e, IdentityError::Store(_));
    for bad in ["a.b", "\u{12}x", "", "a b"] {
        assert!(matches!(
            id.reset_client_secret(bad).await,
            Err(IdentityError::NotFound(_))
        ));
        assert!(id
            .update_user(bad, None, None, Some(true))
            .await
            .is_err_and(not_store));
        assert!(id.delete_user(bad).await.is_err_and(not_store));
        assert!(id.delete_client(bad).await.is_err_and(not_store));
        assert!(id.delete_role(bad).await.is_err_and(not_store));
    }
}

#[tokio::test]
async fn only_a_key_change_makes_verifiers_start_over() {
    let (_d, id) = open().await;
    let r0 = id.current_material().revision;
    id.create_client(new_client("c", ClientKind::Confidential, &[]))
        .await
        .expect("client");
    id.create_api_key("c", vec![]).await.expect("key");
    id.revoke_jti("some-jti", gantry_authn::now_secs() + 60)
        .await
        .expect("revoke");
    id.create_user("u", "long enough", vec![])
        .await
        .expect("user");
    id.create_session("u", vec![]).await.expect("session");
    let m = id.current_material();
    assert_eq!(m.revision, r0, "nothing that verifies tokens changed");
    assert!(m.revoked.contains("some-jti"));
    assert_eq!(m.sessions.map.len(), 1);
    id.rotate_now(0).await.expect("rotate");
    assert!(id.current_material().revision > r0);
}

#[tokio::test]
async fn changing_a_user_ends_their_sessions_and_refresh_families() {
    let (_d, id) = open().await;
    id.create_user("kim", "first password", vec!["admin".into()])
        .await
        .expect("user");
    let (c, _) = id
        .create_client(new_client(
            "spa",
            ClientKind::Public,
            &["password", "refresh_token"],
        ))
        .await
        .expect("client");
    let t = id
        .password(&c, "kim", "first password", None)
        .await
        .expect("login");
    let (cookie, _) = id
        .create_session("kim", vec!["admin".into()])
        .await
        .expect("session");
    assert!(id.session_of(&cookie).is_some());
    id.update_user("kim", None, Some(vec!["viewer".into()]), None)
        .await
        .expect("demote");
    assert!(id.session_of(&cookie).is_none(), "the session ended");
    let r = t.refresh_token.expect("refresh");
    assert!(
        id.refresh(&c, &r, None).await.is_err(),
        "the refresh family ended"
    );
    assert_eq!(
        id.verify(&t.access_token).err(),
        Some(gantry_authn::Denial::Revoked)
    );
}
