// fedhcc dashboard: polls /api/dashboard and draws the page. No library and no external request:
// tables are built with the DOM (text only, never HTML from the server), charts as inline SVG.
'use strict';
(function () {
  const POLL_MS = 2000;
  const SVG = 'http://www.w3.org/2000/svg';
  const PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#17becf', '#8c564b', '#e377c2',
    '#7f7f7f', '#bcbd22'];
  const $ = (id) => document.getElementById(id);
  let last = null;
  let drawnCharts = '';

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, String(attrs[k]));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }

  function fmt(x, digits) {
    return (typeof x === 'number' && isFinite(x)) ? x.toFixed(digits) : '–';
  }

  // A byte count in the unit that keeps it readable (a clinical model's update is a few kB, an
  // image model's megabytes).
  function bytes(n) {
    if (typeof n !== 'number' || !isFinite(n)) return '–';
    if (n < 1e3) return n + ' B';
    if (n < 1e6) return (n / 1e3).toFixed(1) + ' kB';
    if (n < 1e9) return (n / 1e6).toFixed(1) + ' MB';
    return (n / 1e9).toFixed(2) + ' GB';
  }

  function ago(unix, now) {
    if (!unix) return 'never';
    const s = Math.max(0, now - unix);
    if (s < 5) return 'just now';
    if (s < 120) return s + ' s ago';
    if (s < 7200) return Math.round(s / 60) + ' min ago';
    if (s < 172800) return Math.round(s / 3600) + ' h ago';
    return Math.round(s / 86400) + ' days ago';
  }

  function clock(unix) {
    const d = new Date(unix * 1000);
    const p = (n) => String(n).padStart(2, '0');
    return p(d.getHours()) + ':' + p(d.getMinutes()) + ':' + p(d.getSeconds());
  }

  function siteColors(d) {
    const colors = {};
    d.status.sites.forEach((s, i) => { colors[s.site_id] = PALETTE[i % PALETTE.length]; });
    return colors;
  }

  // A line chart: series = [{name, color, width, points: [[round, value], ...]}].
  function lineChart(box, series, opts) {
    box.replaceChildren();
    const drawn = series.filter((s) => s.points.length > 0);
    if (drawn.length === 0) {
      box.appendChild(el('div', opts.empty, 'na'));
      return;
    }
    const W = Math.max(280, box.clientWidth || 360);
    const H = 200;
    const m = { l: 44, r: 10, t: 8, b: 26 };
    const xs = [];
    const ys = [];
    drawn.forEach((s) => s.points.forEach((p) => { xs.push(p[0]); ys.push(p[1]); }));
    let x0 = Math.min.apply(null, xs);
    let x1 = Math.max.apply(null, xs);
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    let y0 = opts.yMin !== undefined ? Math.min(opts.yMin, Math.min.apply(null, ys)) : Math.min.apply(null, ys);
    let y1 = opts.yMax !== undefined ? Math.max(opts.yMax, Math.max.apply(null, ys)) : Math.max.apply(null, ys);
    if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
    const pad = (y1 - y0) * 0.06;
    if (opts.yMin === undefined) y0 -= pad;
    if (opts.yMax === undefined) y1 += pad;
    const X = (x) => m.l + (x - x0) / (x1 - x0) * (W - m.l - m.r);
    const Y = (y) => H - m.b - (y - y0) / (y1 - y0) * (H - m.t - m.b);
    const root = svg('svg', { viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': opts.label });
    for (let i = 0; i <= 4; i++) {
      const v = y0 + (y1 - y0) * i / 4;
      root.appendChild(svg('line', { x1: m.l, x2: W - m.r, y1: Y(v), y2: Y(v), class: 'grid-line' }));
      root.appendChild(svg('text', { x: m.l - 6, y: Y(v) + 3, 'text-anchor': 'end', class: 'tick' }, fmt(v, opts.digits)));
    }
    const step = Math.max(1, Math.ceil((x1 - x0) / 10));
    for (let x = Math.ceil(x0); x <= x1; x += step) {
      root.appendChild(svg('text', { x: X(x), y: H - m.b + 14, 'text-anchor': 'middle', class: 'tick' }, x));
    }
    root.appendChild(svg('text', { x: W - m.r, y: H - 2, 'text-anchor': 'end', class: 'tick' }, 'round'));
    root.appendChild(svg('line', { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b, class: 'axis' }));
    root.appendChild(svg('line', { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: 'axis' }));
    if (opts.ref !== undefined && opts.ref > y0 && opts.ref < y1) {
      root.appendChild(svg('line', { x1: m.l, x2: W - m.r, y1: Y(opts.ref), y2: Y(opts.ref), class: 'ref' }));
    }
    drawn.forEach((s) => {
      const pts = s.points.map((p) => X(p[0]).toFixed(1) + ',' + Y(p[1]).toFixed(1)).join(' ');
      root.appendChild(svg('polyline', { points: pts, fill: 'none', stroke: s.color, 'stroke-width': s.width || 1.8 }));
      s.points.forEach((p) => {
        const c = svg('circle', { cx: X(p[0]), cy: Y(p[1]), r: s.width > 2 ? 3.2 : 2.6, fill: s.color });
        c.appendChild(svg('title', {}, s.name + ', round ' + p[0] + ': ' + fmt(p[1], 4)));
        root.appendChild(c);
      });
    });
    box.appendChild(root);
    const legend = el('div', null, 'legend');
    drawn.forEach((s) => {
      const item = el('span');
      const dot = el('span', null, 'dot');
      dot.style.background = s.color;
      item.appendChild(dot);
      item.appendChild(document.createTextNode(s.name));
      legend.appendChild(item);
    });
    box.appendChild(legend);
  }

  function renderHeader(d) {
    const st = d.status;
    $('study').textContent = st.study_id;
    $('run').textContent = st.run_id;
    $('strategy').textContent = d.strategy;
    $('fingerprint').textContent = (st.model_fingerprint || '').slice(0, 12) || '–';
    $('phase').textContent = st.phase.replace(/_/g, ' ');
    $('round').textContent = st.current_round;
    $('total-rounds').textContent = st.total_rounds;
    $('rounds-completed').textContent = d.rounds_completed;
    $('sites-connected').textContent = st.sites.filter((s) => s.connected).length;
    $('sites-allowed').textContent = st.sites.length;
    $('updated').textContent = 'updated ' + clock(d.generated_unix);
    document.title = 'fedhcc · ' + st.study_id + ' · round ' + st.current_round + '/' + st.total_rounds + ' · ' +
      st.phase.replace(/_/g, ' ');
  }

  function renderSites(d, colors) {
    const extra = {};
    d.sites.forEach((s) => { extra[s.site_id] = s; });
    const body = $('sites').tBodies[0];
    body.replaceChildren();
    d.status.sites.forEach((s) => {
      const x = extra[s.site_id] || {};
      const tr = el('tr');
      tr.dataset.site = s.site_id;
      const name = el('td', null, 'site');
      const dot = el('span', null, 'dot');
      dot.style.background = colors[s.site_id];
      name.appendChild(dot);
      name.appendChild(document.createTextNode(s.site_id));
      tr.appendChild(name);
      tr.appendChild(el('td', s.connected ? 'yes' : 'no', 'connected ' + (s.connected ? 'yes' : 'no')));
      tr.appendChild(el('td', s.selected ? 'yes' : '–', 'selected'));
      tr.appendChild(el('td', ago(s.last_seen_unix, d.generated_unix), 'last-seen'));
      tr.appendChild(el('td', x.client_version || '–', 'version'));
      tr.appendChild(el('td', x.samples ? x.samples : '–', 'num samples'));
      tr.appendChild(el('td', s.rounds_contributed, 'num rounds'));
      tr.appendChild(el('td', x.refusals || 0, 'num refusals'));
      tr.appendChild(el('td', s.last_refusal || '', 'wrap'));
      tr.appendChild(el('td', s.policy_refusal || '', 'wrap declined'));
      body.appendChild(tr);
    });
  }

  function renderRounds(d) {
    const detail = {};
    d.rounds.forEach((r) => { detail[r.round] = r; });
    const body = $('rounds').tBodies[0];
    body.replaceChildren();
    const rows = d.status.rounds.slice().reverse().slice(0, 25);
    if (rows.length === 0) {
      const tr = el('tr');
      const td = el('td', 'No round committed yet.', 'na');
      td.colSpan = 9;
      tr.appendChild(td);
      body.appendChild(tr);
      return;
    }
    rows.forEach((r) => {
      const x = detail[r.round] || { failures: [], aggregate_s: null };
      const tr = el('tr');
      tr.appendChild(el('td', r.round, 'num'));
      tr.appendChild(el('td', r.participants.join(', ')));
      tr.appendChild(el('td', r.total_samples, 'num'));
      tr.appendChild(el('td', fmt(r.mean_train_loss, 4), 'num'));
      tr.appendChild(el('td', fmt(r.duration_s, 1), 'num'));
      tr.appendChild(el('td', fmt(x.aggregate_s, 3), 'num'));
      tr.appendChild(el('td', bytes(r.bytes_in), 'num'));
      tr.appendChild(el('td', bytes(r.bytes_out), 'num'));
      tr.appendChild(el('td', x.failures.map((f) => f.site_id).join(', ')));
      body.appendChild(tr);
    });
  }

  function renderCharts(d, colors) {
    const key = JSON.stringify([d.rounds, d.evaluations, d.status.rounds.length, window.innerWidth]);
    if (key === drawnCharts) return;
    drawnCharts = key;
    const sites = d.status.sites.map((s) => s.site_id);
    const loss = [{
      name: 'global (mean)', color: '#1d2733', width: 3,
      points: d.status.rounds.filter((r) => r.mean_train_loss !== null).map((r) => [r.round, r.mean_train_loss]),
    }];
    sites.forEach((s) => {
      loss.push({
        name: s, color: colors[s],
        points: d.rounds.filter((r) => typeof r.losses[s] === 'number').map((r) => [r.round, r.losses[s]]),
      });
    });
    lineChart($('chart-loss'), loss, { label: 'training loss by round', digits: 3, empty: 'No round committed yet.' });
    const metric = (name) => sites.map((s) => ({
      name: s, color: colors[s],
      points: d.evaluations.filter((e) => e.site_id === s && typeof e.metrics[name] === 'number')
        .map((e) => [e.round, e.metrics[name]]),
    }));
    const when = d.evaluate_every > 0 ? 'every ' + d.evaluate_every + ' rounds' : 'after the last round';
    lineChart($('chart-auc'), metric('auc'), {
      label: 'AUC by round and site', digits: 2, yMin: 0.4, yMax: 1, ref: 0.5,
      empty: 'No evaluation yet: the sites evaluate the global model ' + when + '.',
    });
    lineChart($('chart-cindex'), metric('c_index'), {
      label: 'C-index by round and site', digits: 2, yMin: 0.4, yMax: 1, ref: 0.5,
      empty: 'No C-index reported yet (the sites evaluate ' + when + '; the clinical model reports AUC only).',
    });
  }

  // A metric's key as a heading: auc → AUC, c_index_rfs → C-index (RFS); others with spaces.
  function metricLabel(key) {
    const names = { td_auc: 'time-dependent AUC', auc: 'AUC', c_index: 'C-index', brier: 'Brier score' };
    for (const k of Object.keys(names)) {
      if (key === k) return names[k];
      if (key.startsWith(k + '_')) {
        const rest = key.slice(k.length + 1);
        return names[k] + ' (' + (rest.length <= 4 ? rest.toUpperCase() : rest.replace(/_/g, ' ')) + ')';
      }
    }
    return key.replace(/_/g, ' ');
  }

  // Each cross-center matrix as a table: a row per model (what it was trained on), a column per
  // evaluating site (the study's sites first, in their order), 3 decimals, '–' where not evaluated.
  function renderCrossCenter(box, cc, d) {
    box.replaceChildren();
    if (cc === null || cc === undefined) {
      box.appendChild(el('div', 'Not available yet: put the matrix of each model evaluated at each center in ' +
        'cross-center.json in the server\'s state folder and it appears here.', 'na'));
      return;
    }
    const matrices = [{ metric: cc.metric, rows: cc.rows, note: cc.note }].concat(cc.secondary || []);
    const known = d.status.sites.map((s) => s.site_id);
    matrices.forEach((m) => {
      const seen = new Set();
      m.rows.forEach((r) => Object.keys(r.evaluated_at).forEach((k) => seen.add(k)));
      const cols = known.filter((s) => seen.has(s)).concat([...seen].filter((s) => !known.includes(s)).sort());
      const h = el('h3', metricLabel(m.metric));
      h.title = m.metric;
      box.appendChild(h);
      if (m.rows.length === 0) {
        box.appendChild(el('div', 'No row in this matrix.', 'na'));
      } else {
        const t = el('table', null, 'matrix');
        const head = el('tr');
        head.appendChild(el('th', 'trained on ↓ · evaluated at →'));
        cols.forEach((c) => head.appendChild(el('th', c, 'num')));
        t.appendChild(head);
        m.rows.forEach((r) => {
          const tr = el('tr');
          tr.appendChild(el('th', r.trained_on));
          cols.forEach((c) => tr.appendChild(el('td', fmt(r.evaluated_at[c], 3), 'num')));
          t.appendChild(tr);
        });
        box.appendChild(t);
      }
      if (m.note) box.appendChild(el('div', m.note, 'hint'));
    });
  }

  // Secure aggregation and differential privacy as a two-column table of plain sentences.
  function renderPrivacy(box, p) {
    box.replaceChildren();
    const t = el('table', null, 'facts');
    const row = (k, v, cls) => {
      const tr = el('tr');
      tr.appendChild(el('th', k));
      tr.appendChild(el('td', v, cls || ''));
      t.appendChild(tr);
    };
    if (p === null || p === undefined) {
      row('Secure aggregation', 'off: the server receives each site\'s update (encrypted in transit by mutual TLS)');
      row('Differential privacy', 'off: no noise is added, no ε is spent');
      box.appendChild(t);
      return;
    }
    row('Secure aggregation', p.secure_aggregation
      ? 'on: the server sees only the sum of the sites\' masked updates'
      : 'off: the server receives each site\'s update (encrypted in transit by mutual TLS)', p.secure_aggregation ? 'ok' : '');
    if (p.secure_aggregation) {
      row('Roster now', p.roster && p.roster.length
        ? p.roster.join(', ') + ' (the sites whose masked updates make up this round\'s sum)'
        : '– (fixed at each round\'s key exchange)');
    }
    if (p.dp) {
      row('Differential privacy', 'on: noise multiplier ' + p.dp.noise_multiplier + ', L2 clip ' + p.dp.l2_clip +
        ', δ = ' + p.dp.delta);
      const budget = typeof p.dp.epsilon_budget === 'number'
        ? ' of a budget of ' + fmt(p.dp.epsilon_budget, 2) +
          (typeof p.dp.rounds_allowed === 'number' ? ' (it allows ' + p.dp.rounds_allowed + ' rounds)' : '')
        : ' (no budget set)';
      row('ε spent', fmt(p.dp.epsilon, 2) + budget, 'strong');
    } else {
      row('Differential privacy', 'off: no noise is added, no ε is spent');
    }
    if (p.secure_aggregation) {
      row('Aborted attempts', p.aborted_attempts ? String(p.aborted_attempts) : 'none');
      row('Last aborted attempt', p.last_abort || 'none', p.last_abort ? 'bad' : '');
    }
    box.appendChild(t);
  }

  function renderEvents(d) {
    const list = $('events');
    list.replaceChildren();
    d.events.slice().reverse().slice(0, 100).forEach((e) => {
      const li = el('li');
      li.appendChild(el('span', clock(e.unix), 'time'));
      li.appendChild(el('span', e.kind, 'kind kind-' + e.kind));
      li.appendChild(el('span', (e.site ? e.site + ': ' : '') + e.message));
      list.appendChild(li);
    });
    if (d.events.length === 0) list.appendChild(el('li', 'Nothing has happened yet.', 'na'));
  }

  function render(d) {
    last = d;
    const colors = siteColors(d);
    renderHeader(d);
    renderSites(d, colors);
    renderRounds(d);
    renderCharts(d, colors);
    renderCrossCenter($('cross-center'), d.cross_center, d);
    renderPrivacy($('privacy'), d.privacy);
    renderEvents(d);
    $('conn-state').textContent = d.store_error ? 'the server cannot read its records: ' + d.store_error : '';
  }

  async function poll() {
    try {
      const r = await fetch('/api/dashboard', { credentials: 'same-origin', cache: 'no-store' });
      if (r.status === 401) {
        window.location.assign('/login');
        return;
      }
      if (!r.ok) throw new Error('HTTP ' + r.status);
      render(await r.json());
    } catch (e) {
      $('conn-state').textContent = 'server not reachable (' + e.message + '); retrying';
    }
    setTimeout(poll, POLL_MS);
  }

  window.addEventListener('resize', () => { if (last) renderCharts(last, siteColors(last)); });
  poll();
})();
