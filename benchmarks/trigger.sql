-- The trigger-based alternative to sa_dualwrite, for the benchmark.
--
-- Row-level AFTER triggers on the V1 tables do the same work as the
-- example mappings in examples/contract_alerts/mappings.py. They copy the
-- fields, compute the due date (creation date plus prazo days) and map the
-- status and the action type to English. They translate alerta_id through
-- the cross-reference, and write one cross-reference row per insert and
-- one audit row per change, with the V2 row images before and after.
-- The tables are the ones sa_dualwrite creates (dualwrite_xref,
-- dualwrite_audit), so the benchmark checks both approaches the same way.

CREATE FUNCTION bench_alert_state(status text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE status
        WHEN 'ativo' THEN 'active'
        WHEN 'resolvido' THEN 'resolved'
        WHEN 'cancelado' THEN 'cancelled'
    END
$$;

CREATE FUNCTION bench_event_kind(tipo text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE tipo
        WHEN 'escalar' THEN 'escalated'
        WHEN 'reatribuir' THEN 'reassigned'
        WHEN 'encerrar' THEN 'closed'
        WHEN 'comentar' THEN 'commented'
    END
$$;

CREATE FUNCTION bench_sync_alerta() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    written alerts;
    previous alerts;
    target_id bigint;
    changed jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO alerts (contract_ref, title, description, due_date,
                            owner_login, state, created_at, updated_at)
        VALUES (NEW.contrato_id, NEW.titulo, NEW.descricao,
                CAST(NEW.criado_em AS date) + NEW.prazo, NEW.responsavel,
                bench_alert_state(NEW.status), NEW.criado_em,
                NEW.atualizado_em)
        RETURNING * INTO written;
        INSERT INTO dualwrite_xref (mapping, v1_pk, v2_pk, created_at)
        VALUES ('alertas', CAST(NEW.id AS text), CAST(written.id AS text),
                now());
        INSERT INTO dualwrite_audit (mapping, operation, v1_pk, v2_pk,
                                     status, changes, after, created_at)
        VALUES ('alertas', 'insert', CAST(NEW.id AS text),
                CAST(written.id AS text), 'applied', to_jsonb(NEW) - 'id',
                to_jsonb(written), now());
        RETURN NULL;
    END IF;

    SELECT CAST(v2_pk AS bigint) INTO target_id
      FROM dualwrite_xref
     WHERE mapping = 'alertas' AND v1_pk = CAST(NEW.id AS text);
    SELECT * INTO previous FROM alerts WHERE id = target_id FOR UPDATE;
    UPDATE alerts
       SET contract_ref = NEW.contrato_id,
           title = NEW.titulo,
           description = NEW.descricao,
           due_date = CAST(NEW.criado_em AS date) + NEW.prazo,
           owner_login = NEW.responsavel,
           state = bench_alert_state(NEW.status),
           created_at = NEW.criado_em,
           updated_at = NEW.atualizado_em
     WHERE id = target_id
    RETURNING * INTO written;
    SELECT jsonb_object_agg(item.key, item.value) INTO changed
      FROM jsonb_each(to_jsonb(NEW)) AS item
     WHERE item.value IS DISTINCT FROM to_jsonb(OLD) -> item.key;
    INSERT INTO dualwrite_audit (mapping, operation, v1_pk, v2_pk, status,
                                 changes, before, after, created_at)
    VALUES ('alertas', 'update', CAST(NEW.id AS text),
            CAST(target_id AS text), 'applied', changed, to_jsonb(previous),
            to_jsonb(written), now());
    RETURN NULL;
END
$$;

CREATE FUNCTION bench_sync_acao() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    written alert_events;
BEGIN
    INSERT INTO alert_events (alert_id, kind, actor_login, note, occurred_at)
    SELECT CAST(xref.v2_pk AS bigint), bench_event_kind(NEW.tipo),
           NEW.usuario, NEW.observacao, NEW.registrado_em
      FROM dualwrite_xref AS xref
     WHERE xref.mapping = 'alertas'
       AND xref.v1_pk = CAST(NEW.alerta_id AS text)
    RETURNING * INTO written;
    INSERT INTO dualwrite_xref (mapping, v1_pk, v2_pk, created_at)
    VALUES ('acoes_administrativas', CAST(NEW.id AS text),
            CAST(written.id AS text), now());
    INSERT INTO dualwrite_audit (mapping, operation, v1_pk, v2_pk, status,
                                 changes, after, created_at)
    VALUES ('acoes_administrativas', 'insert', CAST(NEW.id AS text),
            CAST(written.id AS text), 'applied', to_jsonb(NEW) - 'id',
            to_jsonb(written), now());
    RETURN NULL;
END
$$;

CREATE TRIGGER bench_sync_alerta
    AFTER INSERT OR UPDATE ON alertas
    FOR EACH ROW EXECUTE FUNCTION bench_sync_alerta();

CREATE TRIGGER bench_sync_acao
    AFTER INSERT ON acoes_administrativas
    FOR EACH ROW EXECUTE FUNCTION bench_sync_acao();
