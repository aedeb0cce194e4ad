/* SmartEdu Tutor Chat: the one-tag embed for a school's own pages.
 *
 *   <script src="https://TUTOR_HOST/static/widget.js" data-course="algebra-1"
 *           data-token-url="/smartedu/token" async></script>
 *
 * Adds a launcher button (in a shadow root, so host styles do not leak in) that opens the chat in an
 * iframe served by the tutor host (/embed). The JWT is fetched from data-token-url on the host's own
 * origin, handed to the iframe with postMessage addressed to the tutor origin only, and fetched again
 * before it expires. The host page never talks to the tutor's WebSocket itself.
 * Options (data-*): course, token-url (required); tenant (the token's tid: lets the school's per-tenant
 * allowed origins frame /embed); label, position (right|left; default: left on a right-to-left page),
 * dir (rtl|ltr) and lang (default: the page's), theme (light|dark), open ("true" to start open),
 * embed-path (default /embed). API: window.SmartEduWidget.open()/close()/refreshToken(),
 * each taking an optional course (default: the first widget on the page).
 *
 * One widget per course: a tag for another course adds a launcher beside the first; a tag for a course
 * already shown (the script included twice, an SPA adding it again) adds nothing, but puts the widget
 * back, with a fresh chat, when the page had removed it (an SPA's navigation). A removed widget stops
 * refreshing its token, and its iframe, unloaded, closes its socket.
 */
(function () {
  'use strict';

  var script = document.currentScript ||
    document.querySelector('script[src*="/static/widget.js"][data-course]');
  if (!script) return;

  var config = script.dataset;
  var tutorOrigin = new URL(script.src, location.href).origin;
  if (!config.course || !config.tokenUrl) {
    if (window.console) console.warn('SmartEdu widget: data-course and data-token-url are required');
    return;
  }
  var api = window.SmartEduWidget;
  if (!api || !api.widgets) {
    var pick = function (course) {
      return course ? api.widgets[course] : api.widgets[Object.keys(api.widgets)[0]];
    };
    api = window.SmartEduWidget = {
      widgets: {}, // by course, in the order the tags ran
      open: function (course) { var w = pick(course); if (w) w.open(); },
      close: function (course) { var w = pick(course); if (w) w.close(); },
      refreshToken: function (course) { var w = pick(course); return w ? w.refreshToken() : Promise.resolve(); },
      // Places every widget on the page: a slot each in its corner, counted from the corner in the order
      // of their tags in the page (async tags run in whatever order they load), else the order they ran.
      layout: function () {
        var used = { left: 0, right: 0 };
        var shown = Object.keys(api.widgets).map(function (course) { return api.widgets[course]; })
          .filter(function (w) { return w.host.isConnected; });
        shown.sort(function (a, b) {
          if (!a.tag.isConnected || !b.tag.isConnected) return 0;
          return a.tag.compareDocumentPosition(b.tag) & Node.DOCUMENT_POSITION_FOLLOWING ? -1 : 1;
        });
        var rtl = shown.length > 0 && getComputedStyle(shown[0].host.parentElement).direction === 'rtl';
        var across = shown.map(function (w) {
          var corner = w.side();
          var slot = used[corner]++;
          w.restyle(slot, corner);
          // Where it stands along the bottom of the screen, in the page's reading direction.
          var x = corner === 'left' ? slot : 1e6 - slot;
          return { host: w.host, at: rtl ? -x : x };
        });
        across.sort(function (a, b) { return a.at - b.at; });
        arrange(across.map(function (item) { return item.host; }));
      },
    };
  }

  // Tab order is page order: the hosts are put in the order a reader of the page meets the launchers
  // (left to right, or right to left on a right-to-left page), so Tab moves along the row as seen (WCAG
  // 2.4.3); the order the widgets were added in put the launcher by the corner first and went away from
  // it, against the reading direction. From the end, each host goes just before the one after it, so a widget just
  // added is the only one to move. Moving a host reloads its iframe (the chat), except with moveBefore:
  // without it, a host holding a chat stays where it is.
  function arrange(hosts) {
    for (var k = hosts.length - 2; k >= 0; k--) {
      var node = hosts[k];
      var next = hosts[k + 1];
      var parent = next.parentNode;
      if (node.parentNode !== parent || node.compareDocumentPosition(next) & Node.DOCUMENT_POSITION_FOLLOWING) continue;
      var focused = document.activeElement === node ? node.shadowRoot.activeElement : null;
      try {
        parent.moveBefore(node, next);
      } catch (e) { // no moveBefore in this browser
        if (node.shadowRoot.querySelector('iframe')) continue;
        parent.insertBefore(node, next);
        if (focused) focused.focus();
      }
    }
  }

  var existing = api.widgets[config.course];
  if (existing) {
    if (!existing.tag.isConnected) existing.tag = script; // its tag again, after an SPA's navigation
    existing.mount(config.open === 'true');
    return;
  }
  var THEME_VARS = ['--smartedu-accent', '--smartedu-on-accent', '--smartedu-bg', '--smartedu-surface',
    '--smartedu-text', '--smartedu-muted', '--smartedu-border', '--smartedu-user-bg', '--smartedu-user-text',
    '--smartedu-tutor-bg', '--smartedu-tutor-text', '--smartedu-teacher-bg', '--smartedu-teacher-text',
    '--smartedu-teacher-accent', '--smartedu-font', '--smartedu-font-size', '--smartedu-radius', '--smartedu-focus'];
  var CSS_TEXT = [
    ':host{all:initial}',
    // The highest z-index there is: a tie with a host's sticky bar goes to the widget, added last.
    '.launcher{position:fixed;bottom:20px;right:20px;z-index:2147483647;width:56px;height:56px;border-radius:50%;',
    'border:0;cursor:pointer;display:grid;place-items:center;background:var(--smartedu-accent,#2f55c9);',
    'color:var(--smartedu-on-accent,#fff);box-shadow:0 6px 20px rgba(0,0,0,.28)}',
    '.launcher:hover{filter:brightness(1.08)}',
    '.launcher:focus-visible{outline:3px solid var(--smartedu-focus,#1d4ed8);outline-offset:3px}',
    '.launcher svg{width:28px;height:28px;fill:currentColor}',
    '.badge{position:absolute;top:3px;right:3px;width:14px;height:14px;border-radius:50%;background:#d92d20;border:2px solid #fff}',
    '.panel{position:fixed;bottom:88px;right:20px;z-index:2147483647;width:min(400px,calc(100vw - 40px));',
    'height:min(640px,calc(100vh - 112px));height:min(640px,calc(100dvh - 112px));border-radius:16px;',
    'overflow:hidden;background:var(--smartedu-bg,#f4f6fa);box-shadow:0 12px 40px rgba(0,0,0,.3)}',
    '.notice{position:absolute;inset:auto 12px 12px;z-index:1;padding:12px 14px;border-radius:10px;',
    'background:#fff;color:#1a1f2b;border:1px solid #d0d5dd;box-shadow:0 4px 14px rgba(0,0,0,.18);',
    'font:15px/1.4 system-ui,sans-serif}',
    '.notice p{margin:0 0 8px}',
    '.notice button{font:inherit;padding:6px 14px;border-radius:8px;border:0;cursor:pointer;',
    'background:var(--smartedu-accent,#2f55c9);color:var(--smartedu-on-accent,#fff)}',
    '.notice button:focus-visible{outline:3px solid var(--smartedu-focus,#1d4ed8);outline-offset:2px}',
    '.panel iframe{display:block;width:100%;height:100%;border:0}',
    '.left .launcher{right:auto}.left .panel{right:auto;left:20px}',
    '[hidden]{display:none!important}',
    '.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip-path:inset(50%);white-space:nowrap}',
    '@media (max-width:480px){.panel,.left .panel{inset:0;width:100%;height:100%;border-radius:0}',
    '.open .launcher,.behind .launcher{display:none}}',
    '@media (prefers-reduced-motion:no-preference){.panel{transition:opacity .15s}}',
  ].join('');

  var host = document.createElement('div');
  // The first widget keeps the id it always had; each one carries its course.
  if (!document.getElementById('smartedu-widget')) host.id = 'smartedu-widget';
  host.setAttribute('data-course', config.course);
  var shadow = host.attachShadow({ mode: 'open' });
  var sheet = null;
  var style = null;
  if ('adoptedStyleSheets' in shadow && typeof CSSStyleSheet === 'function' && 'replaceSync' in CSSStyleSheet.prototype) {
    sheet = new CSSStyleSheet(); // constructed sheets need no 'unsafe-inline' in the host's CSP
    shadow.adoptedStyleSheets = [sheet];
  } else {
    style = document.createElement('style');
    shadow.appendChild(style);
  }

  // The corner: data-position, else the end of the host page's line, bottom-left on a right-to-left page
  // (dir="rtl"). Read again at each layout, so an SPA that switches its language moves the launcher too.
  function side() {
    if (config.position === 'left' || config.position === 'right') return config.position;
    return pageDirection() === 'rtl' ? 'left' : 'right';
  }

  function pageDirection() {
    var dir = getComputedStyle(host.parentElement || document.documentElement).direction;
    return dir === 'rtl' ? 'rtl' : 'ltr';
  }

  // The launchers in a corner stand in a row from it, one slot each (56 px and a 12 px gap), in the order
  // of their tags, with no gap left by a widget the page removed. Each panel opens in the corner.
  // A CSS zoom on the host page (html { zoom: 1.5 }) would scale the panel's px and vh alike and push
  // it off the top of the screen: the widget undoes it (browser zoom is no CSS zoom, and stays).
  function restyle(slot, corner) {
    wrap.classList.toggle('left', corner === 'left');
    var css = CSS_TEXT + '.launcher{' + corner + ':' + (20 + 68 * slot) + 'px}';
    var zoom = host.parentElement && host.parentElement.currentCSSZoom;
    if (typeof zoom === 'number' && zoom > 0 && zoom !== 1) css += ':host{zoom:' + 1 / zoom + '}';
    if (sheet) sheet.replaceSync(css);
    else style.textContent = css;
  }

  var wrap = document.createElement('div');
  var label = config.label || 'Ask the tutor';
  var launcher = document.createElement('button');
  launcher.type = 'button';
  launcher.className = 'launcher';
  launcher.setAttribute('aria-expanded', 'false');
  launcher.setAttribute('aria-controls', 'smartedu-panel');
  launcher.setAttribute('aria-label', label);
  launcher.title = label;
  var svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  var path = document.createElementNS('http://www.w3.org/2000/svg', 'path');
  path.setAttribute('d', 'M4 3h16a2 2 0 0 1 2 2v11a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V5a2 2 0 0 1 2-2zm3 6a1.5 1.5 0 1 0 0 3 1.5 1.5 0 0 0 0-3zm5 0a1.5 1.5 0 1 0 0 3 1.5 1.5 0 0 0 0-3zm5 0a1.5 1.5 0 1 0 0 3 1.5 1.5 0 0 0 0-3z');
  svg.appendChild(path);
  var badge = document.createElement('span');
  badge.className = 'badge';
  badge.hidden = true;
  var badgeText = document.createElement('span');
  badgeText.className = 'sr';
  badge.appendChild(badgeText);
  launcher.appendChild(svg);
  launcher.appendChild(badge);
  var panel = document.createElement('div');
  panel.className = 'panel';
  panel.id = 'smartedu-panel';
  panel.setAttribute('role', 'region');
  panel.setAttribute('aria-label', 'Tutor chat');
  panel.hidden = true;
  var notice = document.createElement('div');
  notice.className = 'notice';
  notice.setAttribute('role', 'status');
  notice.hidden = true;
  var noticeText = document.createElement('p');
  var retry = document.createElement('button');
  retry.type = 'button';
  retry.textContent = 'Try again';
  notice.appendChild(noticeText);
  notice.appendChild(retry);
  panel.appendChild(notice);
  wrap.appendChild(panel);
  wrap.appendChild(launcher);
  shadow.appendChild(wrap);

  var MIN_REFRESH_MS = 30000;
  var MAX_REFRESH_MS = 24 * 3600 * 1000;
  var TOKEN_TIMEOUT_MS = 15000; // a token endpoint that hangs is given up on, and asked again later
  var iframe = null;
  var frameReady = false; // set when the embed page asks for its token
  var token = null;
  var refreshTimer = null;
  var failures = 0;
  var isOpen = false;
  var pending = null; // the token request in flight

  function post(message) {
    // Addressed to the tutor origin: a navigated-away frame never receives the token.
    if (frameReady && iframe.contentWindow) iframe.contentWindow.postMessage(message, tutorOrigin);
  }

  // Milliseconds until the token should be fetched again (null: it says nothing of its expiry). Counted
  // from its lifetime (exp - iat, both the server's clock) when it has iat, so a client clock that is
  // wrong does not shorten it, and refreshed a minute (or a tenth of the lifetime) early, so a reconnect
  // never meets an expired token. Clamped: setTimeout fires at once for delays over 2^31 - 1 ms.
  function refreshDelay(jwt) {
    var payload;
    try {
      var part = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      payload = JSON.parse(atob(part + '==='.slice((part.length + 3) % 4)));
    } catch (e) {
      return null;
    }
    if (!payload || typeof payload.exp !== 'number') return null;
    var life = typeof payload.iat === 'number' && payload.iat < payload.exp
      ? (payload.exp - payload.iat) * 1000 : payload.exp * 1000 - Date.now();
    return Math.min(MAX_REFRESH_MS, Math.max(MIN_REFRESH_MS, life - Math.max(60000, life * 0.1)));
  }

  function schedule(delay) {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(fetchToken, delay);
  }

  function say(text) {
    noticeText.textContent = text;
    notice.hidden = false;
  }

  function fetchToken() {
    clearTimeout(refreshTimer);
    if (!host.isConnected) return Promise.resolve(); // removed by the page: mount() starts again
    if (pending) return pending;
    if (!notice.hidden) say('Signing you in\u2026');
    retry.disabled = true;
    var controller = typeof AbortController === 'function' ? new AbortController() : null;
    var timeout = controller ? setTimeout(function () { controller.abort(); }, TOKEN_TIMEOUT_MS) : null;
    var status = 0;
    pending = fetch(config.tokenUrl, { credentials: 'same-origin', cache: 'no-store',
      headers: { Accept: 'application/json, text/plain' }, signal: controller ? controller.signal : undefined })
      .then(function (response) {
        status = response.status;
        if (!response.ok) throw new Error('token endpoint answered ' + response.status);
        var type = response.headers.get('Content-Type') || '';
        return type.indexOf('json') >= 0
          ? response.json().then(function (body) { return body && (body.token || body.access_token); })
          : response.text().then(function (text) { return text.trim(); });
      })
      .then(function (value) {
        if (typeof value !== 'string' || value.split('.').length !== 3) throw new Error('no token in the response');
        token = value;
        failures = 0;
        notice.hidden = true;
        post({ type: 'smartedu:token', token: token });
        var delay = refreshDelay(token);
        if (delay !== null) schedule(delay);
      })
      .catch(function (error) {
        failures += 1;
        if (window.console) console.warn('SmartEdu widget: could not fetch a token:', error.message);
        var delay = Math.min(300000, 5000 * Math.pow(2, failures - 1));
        // 401/403: the school's site does not know the student (signed out there); anything else (an
        // error, no answer in time, no network) is the site's trouble, and asking again may help.
        say(status === 401 || status === 403
          ? 'Sign in to your school\u2019s site to use the tutor, then try again.'
          : 'The tutor could not sign you in just now. Trying again in ' + Math.round(delay / 1000) + ' s.');
        schedule(delay);
      })
      .then(function () {
        clearTimeout(timeout);
        pending = null;
        retry.disabled = false;
      });
    return pending;
  }

  retry.addEventListener('click', function () {
    fetchToken();
  });

  function sendTheme() {
    var styles = getComputedStyle(host);
    var vars = {};
    THEME_VARS.forEach(function (name) {
      var value = styles.getPropertyValue(name).trim();
      if (value) vars[name] = value;
    });
    var scheme = config.theme === 'light' || config.theme === 'dark' ? config.theme : null;
    post({ type: 'smartedu:theme', vars: vars, scheme: scheme });
  }

  function ensureFrame() {
    if (iframe) return;
    var src = new URL(config.embedPath || '/embed', tutorOrigin);
    src.searchParams.set('course', config.course);
    // /embed lets the tenant's own allowed_origins frame it only when it knows the tenant.
    if (config.tenant) src.searchParams.set('tenant', config.tenant);
    if (config.theme === 'light' || config.theme === 'dark') src.searchParams.set('theme', config.theme);
    // The chat's layout follows the page's direction, and its messages carry the page's language.
    src.searchParams.set('dir', config.dir === 'rtl' || config.dir === 'ltr' ? config.dir : pageDirection());
    var lang = config.lang || document.documentElement.lang;
    if (lang) src.searchParams.set('lang', lang);
    iframe = document.createElement('iframe');
    iframe.title = 'Tutor chat';
    iframe.src = src.href;
    iframe.setAttribute('allow', 'clipboard-write');
    panel.appendChild(iframe);
    fetchToken();
  }

  function open() {
    mount(false);
    var others = Object.keys(api.widgets).map(function (course) { return api.widgets[course]; })
      .filter(function (other) { return other !== widget; });
    others.forEach(function (other) { other.close(); }); // one panel at a time
    others.forEach(function (other) { other.behind(true); }); // on a phone, only the open one shows
    api.layout();
    ensureFrame();
    isOpen = true;
    panel.hidden = false;
    wrap.classList.add('open');
    launcher.setAttribute('aria-expanded', 'true');
    badge.hidden = true;
    post({ type: 'smartedu:visible', open: true });
    iframe.focus();
  }

  function close() {
    Object.keys(api.widgets).forEach(function (course) { api.widgets[course].behind(false); });
    if (!isOpen) return;
    isOpen = false;
    panel.hidden = true;
    wrap.classList.remove('open');
    launcher.setAttribute('aria-expanded', 'false');
    post({ type: 'smartedu:visible', open: false });
    launcher.focus();
  }

  launcher.addEventListener('click', function () {
    if (isOpen) close();
    else open();
  });

  window.addEventListener('message', function (event) {
    if (!iframe || event.source !== iframe.contentWindow || event.origin !== tutorOrigin) return;
    var data = event.data;
    if (!data || typeof data.type !== 'string') return;
    if (data.type === 'smartedu:ready-for-token') {
      frameReady = true;
      sendTheme();
      if (token) post({ type: 'smartedu:token', token: token });
      post({ type: 'smartedu:visible', open: isOpen });
    } else if (data.type === 'smartedu:token-expired') {
      fetchToken();
    } else if (data.type === 'smartedu:close') {
      close();
    } else if (data.type === 'smartedu:unread' && !isOpen) {
      badge.hidden = false;
      badgeText.textContent = 'New answer';
    }
  });

  // Adds the widget to the page, or puts it back after the page removed it: its iframe was unloaded
  // then (its socket closed), so it starts over closed, with a new iframe and token when opened.
  function mount(startOpen) {
    if (!document.body) return;
    if (!host.isConnected) {
      if (iframe) {
        panel.removeChild(iframe);
        iframe = null;
        frameReady = false;
        token = null;
        failures = 0;
        clearTimeout(refreshTimer);
        isOpen = false;
        panel.hidden = true;
        notice.hidden = true;
        wrap.classList.remove('open');
        launcher.setAttribute('aria-expanded', 'false');
      }
      document.body.appendChild(host);
      api.layout();
      watchRemovals();
    }
    if (startOpen) open();
  }

  // A widget the page removes (and no other) leaves its slot: the ones after it close up the row.
  function watchRemovals() {
    if (typeof MutationObserver !== 'function' || api.watching === document.body) return;
    api.watching = document.body;
    new MutationObserver(function (records) {
      var hosts = Object.keys(api.widgets).map(function (course) { return api.widgets[course].host; });
      var removed = records.some(function (record) {
        return Array.prototype.some.call(record.removedNodes, function (node) { return hosts.indexOf(node) >= 0; });
      });
      if (removed) api.layout();
    }).observe(document.body, { childList: true });
  }

  var widget = { tag: script, host: host, open: open, close: close, refreshToken: fetchToken, mount: mount, side: side,
    restyle: restyle, behind: function (on) { wrap.classList.toggle('behind', on); } };
  api.widgets[config.course] = widget;
  if (document.body) mount(config.open === 'true');
  else document.addEventListener('DOMContentLoaded', function () { mount(config.open === 'true'); });
})();
