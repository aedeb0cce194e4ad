/* SmartEdu Tutor Chat: the chat client (WebSocket protocol v1) used by /chat and the /embed iframe.
 *
 * Two parts, over common.js's Socket (one socket at a time, reconnect with capped exponential backoff
 * and jitter, heartbeat): View (DOM built with createElement/textContent only; no inline styles or
 * handlers, so it runs under the pages' strict CSP) and Client (protocol state: transcript, outbox,
 * streaming answers).
 * The token is kept in memory only; it arrives in the URL fragment or, in the iframe, by postMessage.
 */
(function () {
  'use strict';

  var ns = (window.SmartEdu = window.SmartEdu || {});
  var common = ns.common; // common.js
  var newId = common.newId, cpLength = common.cpLength, cpSlice = common.cpSlice, h = common.h;
  var formatTime = common.formatTime, Transport = common.Socket;
  var ACTIVE = { waiting: true, streaming: true };
  var FINAL = { complete: true, stopped: true, interrupted: true, failed: true };
  var STALE_STREAM_MS = 10 * 60 * 1000;
  var NEW_TOKEN_WAIT_MS = 8000; // after 4401 in the iframe: how long the parent has to send a new token
  var HISTORY_WINDOW = 20;
  var PAUSED_RETRY = 'Your teacher has paused the AI tutor. Try again when it is back.';

  /* ---- helpers --------------------------------------------------------------------------------- */

  function plainText(node) {
    var out = [];
    (function walk(n) {
      if (n.nodeType === 3) { out.push(n.nodeValue); return; }
      for (var c = n.firstChild; c; c = c.nextSibling) walk(c);
      if (n.nodeType === 1 && /^(P|LI|PRE|H\d|TR|BLOCKQUOTE|BR|TD|TH)$/.test(n.nodeName)) out.push(' ');
    })(node);
    return out.join('').replace(/\s+/g, ' ').trim();
  }

  function seconds(value, fallback) {
    var n = typeof value === 'number' && isFinite(value) && value > 0 ? value : fallback;
    return Math.max(1, Math.ceil(n));
  }

  function storageGet(key) {
    try { return window.sessionStorage.getItem(key); } catch (e) { return null; }
  }
  function storageSet(key, value) {
    try {
      if (value == null) window.sessionStorage.removeItem(key);
      else window.sessionStorage.setItem(key, value);
    } catch (e) { /* storage can be disabled; it only holds UI state */ }
  }

  /* ---- View ------------------------------------------------------------------------------------ */

  function View(root, options) {
    this.root = root;
    root.classList.add('se-app');
    root.textContent = '';
    var statusText = h('span', { className: 'se-status__text', text: 'Connecting' });
    var countdown = h('span', { className: 'se-status__count', 'aria-hidden': 'true' });
    var reconnect = h('button', { type: 'button', className: 'se-link-button', hidden: true, text: 'Reconnect now' });
    var close = options.closable
      ? h('button', { type: 'button', className: 'se-icon-button', 'aria-label': 'Close chat', title: 'Close' }, ['\u00d7'])
      : null;
    this.title = h('span', { className: 'se-title__course' });
    this.whoami = h('span', { className: 'se-whoami' });
    var header = h('header', { className: 'se-header' }, [
      h('div', { className: 'se-title-wrap' }, [
        h('h1', { className: 'se-title' }, [h('span', { text: 'Tutor' }), this.title]),
        this.whoami,
      ]),
      h('div', { className: 'se-status', 'data-state': 'connecting' }, [
        h('span', { className: 'se-status__dot', 'aria-hidden': 'true' }),
        h('span', { role: 'status' }, [statusText]),
        countdown,
        reconnect,
      ]),
      close,
    ]);
    // Switching conversations reconnects with another hello: both controls are disabled until it can.
    this.newConversation = h('button', { type: 'button', className: 'se-link-button', disabled: true,
      text: 'New conversation' });
    this.conversationsToggle = h('button', { type: 'button', className: 'se-link-button', disabled: true,
      text: 'Earlier conversations', 'aria-expanded': 'false', 'aria-controls': options.idPrefix + 'conversations' });
    this.conversationList = h('ul', { className: 'se-conversations__list' });
    this.conversationNote = h('p', { className: 'se-conversations__note', hidden: true });
    this.conversations = h('nav', { id: options.idPrefix + 'conversations', className: 'se-conversations',
      'aria-label': 'Your conversations in this course', hidden: true }, [this.conversationNote, this.conversationList]);
    var tools = h('div', { className: 'se-tools' }, [this.newConversation, this.conversationsToggle]);
    this.older = h('button', { type: 'button', className: 'se-older', hidden: true, text: 'Load older messages' });
    this.list = h('ol', { className: 'se-messages' });
    this.empty = h('p', { className: 'se-empty', hidden: true,
      text: 'Ask your tutor anything about this course. Answers arrive as they are written; you can stop them at any time.' });
    this.log = h('section', { className: 'se-log', 'aria-label': 'Conversation', tabindex: '0' },
      [this.older, this.empty, this.list]);
    this.notices = h('div', { className: 'se-notices', 'aria-live': 'polite' });
    this.input = h('textarea', { id: options.idPrefix + 'input', className: 'se-input', rows: '1',
      placeholder: 'Ask your tutor\u2026', 'aria-describedby': options.idPrefix + 'hint', autocomplete: 'off',
      enterkeyhint: 'send', dir: 'auto', lang: options.lang });
    this.send = h('button', { type: 'submit', className: 'se-button se-button--send', text: 'Send' });
    this.stop = h('button', { type: 'button', className: 'se-button se-button--stop', hidden: true,
      text: 'Stop', 'aria-label': 'Stop the answer' });
    this.form = h('form', { className: 'se-composer', 'aria-label': 'Ask a question' }, [
      h('label', { className: 'se-sr-only', for: options.idPrefix + 'input', text: 'Your question' }),
      this.input,
      h('div', { className: 'se-composer__actions' }, [this.stop, this.send]),
      h('p', { id: options.idPrefix + 'hint', className: 'se-hint', text: 'Enter to send \u00b7 Shift+Enter for a new line' }),
    ]);
    this.announcer = h('div', { className: 'se-sr-only', 'aria-live': 'polite', 'aria-atomic': 'true' });
    root.appendChild(header);
    root.appendChild(tools);
    root.appendChild(this.conversations);
    root.appendChild(this.log);
    root.appendChild(this.notices);
    root.appendChild(this.form);
    root.appendChild(this.announcer);
    this.statusBox = header.querySelector('.se-status');
    this.statusText = statusText;
    this.countdown = countdown;
    this.reconnect = reconnect;
    this.close = close;
    this.noticeByKey = {};
    this.stick = true;
    if (!(window.CSS && CSS.supports && CSS.supports('field-sizing', 'content'))) {
      var input = this.input;
      input.addEventListener('input', function () {
        input.style.height = 'auto';
        input.style.height = Math.min(input.scrollHeight, 200) + 'px';
      });
    }
  }

  View.prototype.setStatus = function (state, until) {
    var labels = { connecting: 'Connecting', online: 'Online', reconnecting: 'Reconnecting', offline: 'Offline',
      'signed-out': 'Signed out', waiting: 'Waiting for sign-in' };
    this.statusBox.setAttribute('data-state', state);
    var label = labels[state] || state;
    if (this.statusText.textContent !== label) this.statusText.textContent = label;
    var left = until ? Math.max(0, Math.ceil((until - Date.now()) / 1000)) : 0;
    this.countdown.textContent = state === 'reconnecting' ? ' in ' + left + ' s' : '';
    this.reconnect.hidden = !(state === 'reconnecting' || state === 'offline');
  };

  View.prototype.nearBottom = function () {
    var log = this.log;
    // A hidden panel has no layout; treat it as following the conversation.
    return log.clientHeight === 0 || log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  };

  View.prototype.scrollToBottom = function () {
    this.stick = true;
    this.log.scrollTop = this.log.scrollHeight;
  };

  View.prototype.announce = function (text) {
    var announcer = this.announcer;
    announcer.textContent = '';
    // A fresh text node after a tick is announced even when it equals the previous one.
    setTimeout(function () { announcer.textContent = text; }, 60);
  };

  // A notice: {key, text, srText, until, actions:[{label, run}], tone}. Same key replaces.
  View.prototype.notice = function (spec) {
    var old = this.noticeByKey[spec.key];
    if (old) old.dismiss();
    var self = this;
    var text = h('span', { className: 'se-notice__text' });
    var count = h('span', { className: 'se-notice__count', 'aria-hidden': 'true' });
    var sr = spec.srText ? h('span', { className: 'se-sr-only', text: spec.srText }) : null;
    var dismiss = h('button', { type: 'button', className: 'se-icon-button', 'aria-label': 'Dismiss notice' }, ['\u00d7']);
    var box = h('div', { className: 'se-notice se-notice--' + (spec.tone || 'info'), 'data-code': spec.key },
      [h('span', { className: 'se-notice__msg' }, [text, count]), sr]);
    (spec.actions || []).forEach(function (action) {
      var b = h('button', { type: 'button', className: 'se-link-button', text: action.label });
      b.addEventListener('click', function () { handle.dismiss(); action.run(); });
      box.appendChild(b);
    });
    box.appendChild(dismiss);
    if (sr) text.setAttribute('aria-hidden', 'true');
    text.textContent = spec.text;
    var timer = null;
    var handle = {
      dismiss: function () {
        clearInterval(timer);
        if (box.parentNode) box.parentNode.removeChild(box);
        if (self.noticeByKey[spec.key] === handle) delete self.noticeByKey[spec.key];
      },
    };
    dismiss.addEventListener('click', function () { handle.dismiss(); self.input.focus(); });
    if (spec.until) {
      var tick = function () {
        var left = Math.ceil((spec.until - Date.now()) / 1000);
        if (left <= 0) {
          handle.dismiss();
          if (spec.onEnd) spec.onEnd();
          return;
        }
        count.textContent = ' ' + left + ' s';
      };
      tick();
      timer = setInterval(tick, 1000);
    } else if (spec.ttl) {
      timer = setTimeout(handle.dismiss, spec.ttl);
    }
    this.noticeByKey[spec.key] = handle;
    this.notices.appendChild(box);
    return handle;
  };

  View.prototype.clearNotice = function (key) {
    if (this.noticeByKey[key]) this.noticeByKey[key].dismiss();
  };

  /* ---- Client ---------------------------------------------------------------------------------- */

  var ROLE_LABEL = { user: 'You', assistant: 'Tutor', teacher: 'Teacher' };

  function Client(root, options) {
    this.options = options;
    this.token = options.token || null;
    this.course = options.course || null;
    this.storageKey = 'smartedu.conversation.' + (this.course || '-');
    this.conversationId = options.conversationId || storageGet(this.storageKey);
    this.startNew = false; // the next hello asks for a new conversation (New conversation was pressed)
    this.switchedTo = null; // what to announce after the welcome of a switch
    this.courseId = this.course;
    this.conversationsAsked = null; // the pending list request (a newer one, or closing, makes it stale)
    this.lastSeq = 0;
    this.ready = false;
    this.everWelcomed = false;
    this.features = {};
    this.byServerId = new Map();
    this.byClientId = new Map();
    this.outbox = [];
    this.oldestId = null;
    this.hasMore = false;
    this.loadingOlder = false;
    this.rateUntil = 0;
    this.rateTimer = null;
    this.dirty = new Set();
    this.signedOut = false;
    this.tokenTimer = null;
    this.aiPaused = false;
    this.regenerating = new Map(); // reply id (as an error's ref) -> the answer whose Retry was clicked
    this.visible = true;
    this.view = new View(root, { closable: options.mode === 'embed', idPrefix: 'se-' + newId().slice(0, 6) + '-',
      lang: options.lang });
    if (this.course) this.view.title.textContent = this.course;
    var scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    var self = this;
    this.pacer = new common.Pacer(function () { self.renderDirty(); });
    this.transport = new Transport(options.socketUrl || scheme + '//' + location.host + '/ws', {
      onOpen: function () { self.sendHello(); },
      onFrame: function (frame) { self.onFrame(frame); },
      onClose: function (code) { return self.onClose(code); },
      onState: function (state, until) { if (!self.signedOut) self.view.setStatus(state, until); },
    });
    this.bindUi();
  }

  Client.prototype.start = function () {
    if (!this.token) {
      this.view.setStatus('waiting');
      return;
    }
    this.transport.start();
  };

  Client.prototype.setToken = function (token) {
    var had = this.token;
    if (this.signedOut && token === had) return; // the token just refused: another try fails the same way
    this.token = token;
    if (this.signedOut || !had) {
      clearTimeout(this.tokenTimer);
      this.signedOut = false;
      this.view.clearNotice('unauthorized');
      this.transport.reconnectNow();
    }
  };

  Client.prototype.bindUi = function () {
    var self = this;
    var view = this.view;
    view.form.addEventListener('submit', function (event) {
      event.preventDefault();
      self.submit();
    });
    view.input.addEventListener('keydown', function (event) {
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
        event.preventDefault();
        self.submit();
      }
    });
    view.stop.addEventListener('click', function () { self.stopAnswer(); });
    view.reconnect.addEventListener('click', function () { self.transport.reconnectNow(); });
    view.older.addEventListener('click', function () { self.loadOlder(); });
    view.newConversation.addEventListener('click', function () { self.switchTo(null); });
    view.conversationsToggle.addEventListener('click', function () {
      if (view.conversations.hidden) self.openConversations();
      else self.closeConversations(true);
    });
    var escape = function (event) {
      if (event.key !== 'Escape' || view.conversations.hidden) return;
      event.stopPropagation(); // the embed's Escape closes the whole panel: here it closes only the list
      self.closeConversations(true);
    };
    view.conversations.addEventListener('keydown', escape);
    view.conversationsToggle.addEventListener('keydown', escape);
    view.log.addEventListener('scroll', function () {
      view.stick = view.nearBottom();
      if (view.log.scrollTop < 40 && self.hasMore) self.loadOlder();
    }, { passive: true });
    if (window.ResizeObserver) {
      // Keep the newest message in view when the panel is resized, rotated or shown again.
      new ResizeObserver(function () { if (view.stick) view.scrollToBottom(); }).observe(view.log);
    }
    if (view.close) {
      view.close.addEventListener('click', function () { self.emit('close'); });
    }
  };

  Client.prototype.emit = function (name, detail) {
    if (this.options.onEvent) this.options.onEvent(name, detail || {});
  };

  /* -- connection ------------------------------------------------------------------------------- */

  Client.prototype.sendHello = function () {
    this.ready = false;
    var hello = { type: 'hello', token: this.token };
    if (this.course) hello.course_id = this.course;
    if (this.startNew) hello.new_conversation = true;
    else if (this.conversationId) hello.conversation_id = this.conversationId;
    if (this.conversationId && this.everWelcomed && this.lastSeq > 0) hello.resume_from = this.lastSeq;
    this.transport.send(hello);
  };

  Client.prototype.onClose = function (code) {
    this.ready = false;
    this.olderLoaded();
    this.updateStop();
    if (code === 4401) {
      this.signedOut = true;
      this.view.setStatus('signed-out');
      if (this.options.mode === 'embed') {
        this.emit('token-expired'); // widget.js (or any parent that speaks the protocol) sends a new one
        this.awaitNewToken();
      } else {
        this.view.notice({ key: 'unauthorized', tone: 'error',
          text: 'Your sign-in has expired. Open the tutor again from your school\u2019s site.' });
      }
      return 'stop';
    }
    if (code === 4403 || code === 1008) {
      this.signedOut = true;
      this.view.setStatus('signed-out');
      return 'stop';
    }
    if (code === 1012) return 800 + Math.random() * 1500; // server restarting: come back soon, spread out
    return undefined;
  };

  // A token from the URL came with an LTI launch (or a web view): the parent, an LMS, never answers
  // token-expired, so the student is told at once how to get a new one. Otherwise the parent has
  // NEW_TOKEN_WAIT_MS to send one.
  Client.prototype.awaitNewToken = function () {
    var view = this.view;
    var expired = function () {
      view.notice({ key: 'unauthorized', tone: 'error',
        text: 'Your sign-in has expired. Open the tutor again from your course.' });
    };
    clearTimeout(this.tokenTimer);
    if (this.options.tokenFromUrl) {
      expired();
      return;
    }
    view.notice({ key: 'unauthorized', tone: 'warn', text: 'Signing you in again\u2026' });
    this.tokenTimer = setTimeout(expired, NEW_TOKEN_WAIT_MS);
  };

  Client.prototype.onFrame = function (frame) {
    // lastSeq follows the frames received. A resumed welcome's seq is where the replay that follows it
    // will end: taken early, a socket lost mid-replay would make the next resume_from skip the rest.
    if (frame.type !== 'welcome' && typeof frame.seq === 'number' && frame.seq > this.lastSeq &&
        (!frame.conversation_id || frame.conversation_id === this.conversationId)) {
      this.lastSeq = frame.seq;
    }
    switch (frame.type) {
      case 'welcome': this.onWelcome(frame); break;
      case 'ack': this.onAck(frame); break;
      case 'token': this.onToken(frame); break;
      case 'done': this.onDone(frame); break;
      case 'history': this.onHistory(frame); break;
      case 'error': this.onError(frame); break;
      case 'reconnect': this.onReconnect(frame); break;
      case 'teacher_message': this.onTeacherMessage(frame); break;
      case 'ai_state': this.onAiState(frame.paused === true, frame.conversation_id); break;
      case 'message': this.onServerMessage(frame); break;
      default: break; // pong and frame types from newer servers
    }
  };

  Client.prototype.onWelcome = function (f) {
    var firstConversation = this.conversationId;
    this.conversationId = f.conversation_id || this.conversationId;
    this.startNew = false;
    this.courseId = f.course_id || null;
    storageSet(this.storageKey, this.conversationId);
    this.ready = true;
    this.olderLoaded();
    this.transport.welcome();
    this.features = {};
    (Array.isArray(f.features) ? f.features : []).forEach(function (name) { this.features[name] = true; }, this);
    if (f.user) {
      this.user = f.user;
      this.view.whoami.textContent = f.user.name ? 'Signed in as ' + f.user.name : '';
    }
    if (f.course_title || f.course_id) this.view.title.textContent = f.course_title || f.course_id;
    var resumed = f.resumed === true && this.everWelcomed && firstConversation === this.conversationId;
    if (!resumed) {
      this.resetTranscript(Array.isArray(f.history) ? f.history : [], f.has_more);
      this.lastSeq = typeof f.seq === 'number' ? f.seq : 0; // the history holds everything up to seq
    }
    this.everWelcomed = true;
    if (typeof f.ai_paused === 'boolean') this.onAiState(f.ai_paused, this.conversationId);
    this.view.clearNotice('unauthorized');
    this.view.clearNotice('forbidden');
    this.view.clearNotice('busy');
    this.flushOutbox(true);
    var self = this;
    this.byServerId.forEach(function (item) {
      if (item.kind === 'assistant' && item.stopRequested && ACTIVE[item.status]) {
        self.transport.send({ type: 'cancel', reply_id: item.id });
      }
    });
    this.updateStop();
    if (this.switchedTo) {
      this.view.announce(this.switchedTo);
      this.switchedTo = null;
    }
    this.emit('ready');
  };

  Client.prototype.onReconnect = function (f) {
    var after = typeof f.after_ms === 'number' && f.after_ms >= 0 ? f.after_ms : 1000;
    this.transport.detach(undefined, after + Math.random() * Math.min(1000, after * 0.2 + 100));
  };

  /* -- transcript ------------------------------------------------------------------------------- */

  Client.prototype.makeItem = function (m) {
    var kind = m.role === 'assistant' || m.role === 'teacher' ? m.role : 'user';
    var text = typeof m.text === 'string' ? m.text : '';
    var status = m.status || 'complete';
    if (kind === 'assistant' && status === 'streaming') {
      var age = Date.now() - new Date(m.created_at).getTime();
      status = age > STALE_STREAM_MS ? 'interrupted' : text ? 'streaming' : 'waiting';
    }
    var item = {
      kind: kind, id: typeof m.id === 'number' ? m.id : null, clientId: null, text: text, len: cpLength(text),
      pieces: new Map(), gap: false, status: kind === 'user' ? 'sent' : status, createdAt: m.created_at,
      question: null, announced: FINAL[status] === true, stopRequested: false, retried: false, li: null,
    };
    outcome(item, m);
    return item;
  };

  // What a `done` or a history item says of how an answer ended, beyond its status (see renderMeta).
  function outcome(item, f) {
    item.truncated = f.truncated === true;
    item.blocked = f.blocked === true; // a safety filter stopped it: the text ends with the server's safety note
    if (typeof f.error === 'string') item.failure = f.error;
    if (f.retryable === false) item.noRetry = true; // asking again cannot help
  }

  Client.prototype.resetTranscript = function (history, hasMore) {
    var previous = this.byServerId;
    // Messages not yet acknowledged (queued, or refused with an Edit button) stay at the end, in order.
    var local = Array.prototype.filter.call(this.view.list.children, function (li) { return !li.hasAttribute('data-id'); });
    this.byServerId = new Map();
    this.view.list.textContent = '';
    var lastQuestion = null;
    var self = this;
    history.forEach(function (m) {
      var item = self.makeItem(m);
      var known = item.id != null ? previous.get(item.id) : null;
      // The database has no text for an answer still streaming; keep what this page already showed.
      if (known && known.kind === 'assistant' && ACTIVE[item.status] && known.len > item.len) {
        item.text = known.text;
        item.len = known.len;
        item.pieces = known.pieces;
        item.status = 'streaming';
        item.stopRequested = known.stopRequested;
      }
      if (item.kind === 'user') lastQuestion = item.text;
      else if (item.kind === 'assistant') item.question = lastQuestion;
      self.append(item);
    });
    local.forEach(function (li) { self.view.list.appendChild(li); });
    this.oldestId = history.length ? history[0].id : null;
    this.hasMore = typeof hasMore === 'boolean' ? hasMore : history.length >= HISTORY_WINDOW;
    this.view.older.hidden = !this.hasMore;
    this.refreshEmpty();
    this.view.scrollToBottom();
  };

  Client.prototype.refreshEmpty = function () {
    this.view.empty.hidden = this.view.list.firstChild !== null;
  };

  Client.prototype.register = function (item) {
    if (item.id != null) this.byServerId.set(item.id, item);
    if (item.clientId) this.byClientId.set(item.clientId, item);
  };

  Client.prototype.append = function (item, after) {
    this.register(item);
    this.render(item);
    var list = this.view.list;
    if (after && after.li && after.li.parentNode === list) list.insertBefore(item.li, after.li.nextSibling);
    else list.appendChild(item.li);
    this.refreshEmpty();
  };

  Client.prototype.render = function (item) {
    var self = this;
    if (!item.li) {
      // Each message runs in its own text's direction (an Arabic answer on an English page, or the other
      // way round); `lang` is the host page's, which the widget passes on (the controls stay English).
      item.body = h('div', { className: 'se-bubble__body', dir: 'auto', lang: this.options.lang });
      item.statusEl = h('span', { className: 'se-meta__status' });
      item.actions = h('span', { className: 'se-meta__actions' });
      var label = ROLE_LABEL[item.kind];
      item.li = h('li', { className: 'se-msg se-msg--' + item.kind }, [
        h('div', { className: 'se-bubble' }, [
          item.kind === 'teacher'
            ? h('span', { className: 'se-badge', text: item.name ? 'Teacher \u00b7 ' + item.name : 'Teacher' })
            : h('span', { className: 'se-sr-only', text: label + ':' }),
          item.body,
        ]),
        h('div', { className: 'se-meta' }, [
          item.kind === 'teacher' ? null : h('span', { className: 'se-meta__who', 'aria-hidden': 'true', text: label }),
          item.createdAt ? h('time', { datetime: item.createdAt, text: formatTime(item.createdAt) }) : null,
          item.statusEl,
          item.actions,
        ]),
      ]);
      item.li.addEventListener('click', function (event) {
        var target = event.target;
        if (!(target instanceof HTMLElement) || !target.hasAttribute('data-action')) return;
        self.action(item, target.getAttribute('data-action'));
      });
    }
    item.li.setAttribute('data-status', item.status);
    if (item.id != null) item.li.setAttribute('data-id', String(item.id));
    if (item.clientId) item.li.setAttribute('data-client-id', item.clientId);
    this.renderBody(item);
    this.renderMeta(item);
  };

  Client.prototype.renderBody = function (item) {
    var body = item.body;
    if (item.kind === 'user') {
      if (body.textContent !== item.text) body.textContent = item.text;
      return;
    }
    // Streamed answers grow at their end: only the text after the blocks already built is parsed again.
    (item.extras || []).forEach(function (node) { if (node.parentNode) node.parentNode.removeChild(node); });
    item.extras = [];
    if (!item.markdown) item.markdown = new ns.MarkdownStream(body);
    item.markdown.render(item.text);
    var active = item.kind === 'assistant' && ACTIVE[item.status];
    item.li.setAttribute('aria-busy', active ? 'true' : 'false');
    if (active) {
      var typing = h('span', { className: item.text ? 'se-caret' : 'se-typing', 'aria-hidden': 'true' },
        item.text ? [] : [h('span'), h('span'), h('span')]);
      var last = body.lastElementChild;
      (last && /^(P|LI)$/.test(last.nodeName) ? last : body).appendChild(typing);
      item.extras.push(typing);
      if (!item.text) item.extras.push(body.appendChild(h('span', { className: 'se-sr-only', text: 'Tutor is typing' })));
    }
  };

  var TRUNCATED = 'Cut short: the answer reached its length limit';
  var BLOCKED = 'This answer was stopped by the safety filter.';

  var STATUS_TEXT = {
    queued: 'Waiting for connection \u2014 will send automatically',
    sending: 'Sending\u2026',
    held: 'Waiting to send',
    rejected: 'Not sent',
    stopped: 'Stopped',
    interrupted: 'Interrupted',
    failed: 'The answer could not be completed',
    waiting: 'Thinking\u2026',
  };

  // A failed answer that asking again cannot help: why, as the error sent with it said.
  var FAILED_FOR_GOOD = {
    ai_declined: 'The tutor can\u2019t answer that question',
    ai_unavailable: 'The tutor is unavailable; your school\u2019s staff have been told',
    ai_rejected: 'The tutor could not process this conversation',
  };

  Client.prototype.renderMeta = function (item) {
    var text = STATUS_TEXT[item.status] || '';
    if (item.status === 'rejected' && item.reason) text = 'Not sent: ' + item.reason;
    if (item.stopRequested && ACTIVE[item.status]) text = 'Stopping\u2026';
    if (item.gap && FINAL[item.status]) text = 'Loading the full answer\u2026';
    else if (item.status === 'complete' && item.truncated) text = TRUNCATED;
    else if (item.status === 'failed' && item.noRetry && FAILED_FOR_GOOD[item.failure]) {
      text = FAILED_FOR_GOOD[item.failure];
    }
    item.statusEl.textContent = text;
    // In the bubble, so it is read with the answer (and after a reload, from the history's `blocked`).
    var blocked = item.kind === 'assistant' && item.status === 'complete' && item.blocked;
    if (blocked && !item.note) {
      item.note = h('p', { className: 'se-note se-note--blocked', role: 'note', text: BLOCKED });
      item.body.parentNode.appendChild(item.note);
    } else if (!blocked && item.note) {
      item.note.parentNode.removeChild(item.note);
      item.note = null;
    }
    item.actions.textContent = '';
    if (item.kind === 'assistant' && (item.status === 'failed' || item.status === 'interrupted') && !item.retried &&
        !item.noRetry && item.question) {
      item.actions.appendChild(h('button', { type: 'button', className: 'se-link-button', 'data-action': 'retry',
        text: 'Retry', 'aria-label': 'Retry this question' }));
    }
    if (item.kind === 'user' && item.status === 'rejected') {
      item.actions.appendChild(h('button', { type: 'button', className: 'se-link-button', 'data-action': 'edit',
        text: 'Edit', 'aria-label': 'Edit this message' }));
      item.actions.appendChild(h('button', { type: 'button', className: 'se-link-button', 'data-action': 'resend',
        text: 'Try again', 'aria-label': 'Send this message again' }));
    }
  };

  Client.prototype.markDirty = function (item) {
    this.dirty.add(item);
    this.pacer.request();
  };

  Client.prototype.flushRender = function () {
    this.pacer.flush();
  };

  Client.prototype.renderDirty = function () {
    var stick = this.view.stick || this.view.nearBottom();
    var self = this;
    this.dirty.forEach(function (item) { self.render(item); });
    this.dirty.clear();
    if (stick) this.view.scrollToBottom();
  };

  Client.prototype.action = function (item, name) {
    if (name === 'retry') {
      if (this.aiPaused) {
        this.view.notice({ key: 'ai-paused-retry', tone: 'info', text: PAUSED_RETRY, ttl: 15000 });
        return;
      }
      item.retried = true;
      this.render(item);
      if (this.features.regenerate && this.ready) {
        // Answered with an ack (regenerated: true) that names the new reply, or an error whose ref is the
        // old reply's id, which gives the Retry button back.
        this.regenerating.set(String(item.id), item);
        this.transport.send({ type: 'regenerate', reply_id: item.id });
      } else {
        this.queue(item.question);
      }
      this.view.input.focus();
    } else if (name === 'edit') {
      this.view.input.value = item.text;
      this.remove(item);
      this.view.input.focus();
    } else if (name === 'resend') {
      item.status = 'queued';
      item.attempts = 0;
      if (this.outbox.indexOf(item) < 0) this.outbox.push(item);
      this.render(item);
      this.flushOutbox(false);
    }
  };

  Client.prototype.remove = function (item) {
    if (item.li && item.li.parentNode) item.li.parentNode.removeChild(item.li);
    var at = this.outbox.indexOf(item);
    if (at >= 0) this.outbox.splice(at, 1);
    if (item.clientId) this.byClientId.delete(item.clientId);
    if (item.id != null && this.byServerId.get(item.id) === item) this.byServerId.delete(item.id);
    this.refreshEmpty();
  };

  /* -- sending ---------------------------------------------------------------------------------- */

  Client.prototype.submit = function () {
    var text = this.view.input.value;
    if (!text.trim()) return;
    if (this.signedOut && !this.token) return;
    this.view.input.value = '';
    this.view.input.style.height = '';
    this.queue(text);
    this.view.input.focus();
  };

  Client.prototype.queue = function (text) {
    var item = this.makeItem({ role: 'user', text: text, created_at: new Date().toISOString() });
    item.clientId = newId();
    item.status = 'queued';
    item.attempts = 0;
    this.outbox.push(item);
    this.append(item);
    this.flushOutbox(false);
    this.view.scrollToBottom();
  };

  // Send every unacknowledged message (all of them again after a new welcome: the server dedupes by id).
  Client.prototype.flushOutbox = function (afterWelcome) {
    if (!this.ready) return;
    var wait = this.rateUntil - Date.now();
    if (wait > 0) {
      var self = this;
      clearTimeout(this.rateTimer);
      this.rateTimer = setTimeout(function () { self.flushOutbox(false); }, wait + 50);
      this.outbox.forEach(function (item) {
        if (item.status === 'queued') { item.status = 'held'; self.render(item); }
      });
      return;
    }
    for (var i = 0; i < this.outbox.length; i++) {
      var item = this.outbox[i];
      if (item.status === 'rejected') continue;
      if (item.status === 'sending' && !afterWelcome) continue;
      var frame = { type: 'message', id: item.clientId, text: item.text };
      if (this.conversationId) frame.conversation_id = this.conversationId;
      if (!this.transport.send(frame)) break;
      item.status = 'sending';
      this.render(item);
    }
    this.updateStop();
  };

  Client.prototype.onAck = function (f) {
    if (f.conversation_id && this.conversationId && f.conversation_id !== this.conversationId) return;
    var mine = typeof f.id === 'string' ? this.byClientId.get(f.id) : null;
    var existing = this.byServerId.get(f.message_id);
    var question;
    if (mine && mine.kind === 'user') {
      var at = this.outbox.indexOf(mine);
      if (at >= 0) this.outbox.splice(at, 1);
      if (existing && existing !== mine) {
        // The committed question is already shown (from a welcome's history): drop the local copy.
        this.remove(mine);
        existing.clientId = mine.clientId;
        existing.stopRequested = existing.stopRequested || mine.stopRequested;
        question = existing;
      } else if (mine.status !== 'sent') {
        mine.id = f.message_id;
        mine.status = 'sent';
        this.register(mine);
        this.render(mine);
        question = mine;
      } else {
        question = mine;
      }
    } else if (existing) {
      question = existing;
    } else {
      // A question sent from another tab or device of the same user.
      question = this.makeItem({ role: 'user', id: f.message_id, text: typeof f.text === 'string' ? f.text : '',
        created_at: new Date().toISOString() });
      question.clientId = typeof f.id === 'string' ? f.id : null;
      this.append(question);
    }
    // No reply_id: the teacher paused the tutor; the question waits and its answer starts with tokens.
    var reply = typeof f.reply_id === 'number' ? this.byServerId.get(f.reply_id) : null;
    if (!reply && typeof f.reply_id === 'number') {
      reply = this.makeItem({ role: 'assistant', id: f.reply_id, text: '', status: 'streaming',
        created_at: new Date().toISOString() });
      reply.status = 'waiting';
      reply.announced = false;
      reply.question = question.text;
      var stick = this.view.nearBottom();
      // A regenerated answer is the newest row of the conversation, so it goes last (as after a reload).
      this.append(reply, f.regenerated ? null : question);
      if (stick) this.view.scrollToBottom();
    }
    if (reply && question.stopRequested && ACTIVE[reply.status] && !reply.stopRequested) {
      question.stopRequested = false;
      this.cancel(reply);
    }
    this.updateStop();
  };

  /* -- streaming -------------------------------------------------------------------------------- */

  Client.prototype.onToken = function (f) {
    if (f.conversation_id && f.conversation_id !== this.conversationId) return;
    if (typeof f.text !== 'string' || typeof f.reply_id !== 'number') return;
    var item = this.byServerId.get(f.reply_id);
    if (!item) {
      item = this.makeItem({ role: 'assistant', id: f.reply_id, text: '', status: 'streaming',
        created_at: new Date().toISOString() });
      item.status = 'streaming';
      item.announced = false;
      this.append(item);
    }
    if (item.kind !== 'assistant' || FINAL[item.status]) return;
    this.addPiece(item, typeof f.offset === 'number' ? f.offset : item.len, f.text);
    if (item.status === 'waiting') {
      item.status = 'streaming';
      this.updateStop();
    }
    this.markDirty(item);
  };

  // Place a piece of the answer at its code-point offset: drop what we already have, hold what
  // comes after a gap until the gap is filled (a resumed stream) or the committed text is fetched.
  Client.prototype.addPiece = function (item, offset, text) {
    var length = cpLength(text);
    if (offset + length <= item.len) return;
    if (offset > item.len) {
      if (!item.pieces.has(offset) || cpLength(item.pieces.get(offset)) < length) item.pieces.set(offset, text);
      item.gap = true;
      return;
    }
    item.text += offset === item.len ? text : cpSlice(text, item.len - offset);
    item.len = offset + length;
    var progress = true;
    while (progress && item.pieces.size) {
      progress = false;
      item.pieces.forEach(function (piece, at) {
        if (at <= item.len) {
          item.pieces.delete(at);
          if (at + cpLength(piece) > item.len) {
            item.text += cpSlice(piece, item.len - at);
            item.len = at + cpLength(piece);
          }
          progress = true;
        }
      });
    }
    item.gap = item.pieces.size > 0;
  };

  Client.prototype.onDone = function (f) {
    if (f.conversation_id && f.conversation_id !== this.conversationId) return;
    var item = this.byServerId.get(f.reply_id);
    if (!item) {
      item = this.makeItem({ role: 'assistant', id: f.reply_id, text: '', status: 'streaming',
        created_at: new Date().toISOString() });
      item.announced = false;
      this.append(item);
    }
    if (item.kind !== 'assistant') return;
    item.status = FINAL[f.status] ? f.status : 'complete';
    item.stopRequested = false;
    outcome(item, f); // the error that follows says more
    var complete = typeof f.length === 'number' ? item.len === f.length && !item.gap : !item.gap;
    if (!complete) {
      item.gap = true;
      this.repair(item);
    }
    this.markDirty(item);
    this.flushRender();
    if (complete) this.finished(item);
    this.updateStop();
  };

  // Fetch the committed text of an answer whose stream had a gap (v1 servers do not replay frames).
  Client.prototype.repair = function (item) {
    var self = this;
    var url = '/api/conversations/' + encodeURIComponent(this.conversationId) + '/messages?limit=1&before=' + (item.id + 1);
    var base = this.options.apiBase || '';
    fetch(base + url, { headers: { Authorization: 'Bearer ' + this.token }, credentials: 'omit', cache: 'no-store' })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (page) {
        var row = page && Array.isArray(page.messages) ? page.messages.filter(function (m) { return m.id === item.id; })[0] : null;
        if (row && typeof row.text === 'string') {
          item.text = row.text;
          item.len = cpLength(row.text);
          if (FINAL[row.status]) { item.status = row.status; outcome(item, row); }
        }
      })
      .catch(function () { /* keep the partial text */ })
      .then(function () {
        item.gap = false;
        item.pieces = new Map();
        self.markDirty(item);
        self.flushRender();
        self.finished(item);
      });
  };

  Client.prototype.finished = function (item) {
    if (item.announced) return;
    item.announced = true;
    var words = {
      complete: 'The tutor answered: ',
      stopped: 'Answer stopped: ',
      interrupted: 'The answer was interrupted. Use Retry to ask again. ',
      failed: 'The answer could not be completed. Use Retry to ask again. ',
    };
    if (item.truncated) words.complete = 'The tutor answered (cut short at its length limit): ';
    if (item.blocked) words.complete = 'The safety filter stopped the tutor\u2019s answer: ';
    if (item.noRetry) words.failed = 'The answer could not be completed. ';
    var plain = item.body ? plainText(item.body) : '';
    this.view.announce((words[item.status] || '') + plain);
    if (!this.visible) this.emit('unread');
  };

  Client.prototype.activeReplies = function () {
    var replies = [];
    this.byServerId.forEach(function (item) {
      if (item.kind === 'assistant' && ACTIVE[item.status]) replies.push(item);
    });
    replies.sort(function (a, b) {
      if (a.status !== b.status) return a.status === 'streaming' ? -1 : 1;
      return a.id - b.id;
    });
    return replies;
  };

  Client.prototype.updateStop = function () {
    var active = this.activeReplies().length > 0 ||
      this.outbox.some(function (item) { return item.status === 'sending'; });
    var stop = this.view.stop;
    var hadFocus = document.activeElement === stop;
    stop.hidden = !active;
    stop.disabled = !active;
    if (hadFocus && !active) this.view.input.focus();
    this.updateConversationControls();
  };

  Client.prototype.stopAnswer = function () {
    var replies = this.activeReplies().filter(function (item) { return !item.stopRequested; });
    if (replies.length) {
      this.cancel(replies[0]);
      return;
    }
    var sending = this.outbox.filter(function (item) { return item.status === 'sending'; });
    if (sending.length) sending[sending.length - 1].stopRequested = true; // cancelled as soon as it is acked
  };

  Client.prototype.cancel = function (reply) {
    reply.stopRequested = true;
    this.transport.send({ type: 'cancel', reply_id: reply.id });
    this.render(reply);
  };

  /* -- conversations ---------------------------------------------------------------------------- */

  // Switching waits while an answer streams or a question is not yet acknowledged: it neither stops the
  // answer nor drops the question (both would go on in the conversation being left, unseen).
  Client.prototype.canSwitch = function () {
    return this.ready && this.activeReplies().length === 0 &&
      !this.outbox.some(function (item) { return item.status !== 'rejected'; });
  };

  Client.prototype.updateConversationControls = function () {
    var view = this.view;
    var can = this.canSwitch();
    view.newConversation.disabled = !can;
    view.conversationsToggle.disabled = !can;
    if (!can && !view.conversations.hidden) {
      var inside = view.conversations.contains(document.activeElement);
      this.closeConversations(false);
      if (inside) view.input.focus();
    }
  };

  // `conversationId` null: a new conversation (the server reuses the course's empty one, if any).
  Client.prototype.switchTo = function (conversationId, title) {
    if (!this.canSwitch()) return;
    this.closeConversations(false);
    if (conversationId && conversationId === this.conversationId) {
      this.view.input.focus();
      return;
    }
    this.startNew = !conversationId;
    this.conversationId = conversationId || null;
    this.switchedTo = conversationId ? 'Opened the conversation ' + (title || 'without a title') : 'New conversation started';
    this.everWelcomed = false; // nothing to resume: the welcome's history is the whole transcript
    this.lastSeq = 0;
    this.outbox = [];
    this.byServerId = new Map();
    this.byClientId = new Map();
    this.regenerating = new Map();
    this.view.list.textContent = '';
    this.oldestId = null;
    this.hasMore = false;
    this.view.older.hidden = true;
    this.refreshEmpty();
    this.ready = false;
    this.updateStop();
    this.view.input.focus();
    this.transport.stop(); // a socket's conversation is chosen by its hello: say hello again on a new one
    this.transport.start();
  };

  Client.prototype.openConversations = function () {
    var view = this.view;
    var self = this;
    view.conversations.hidden = false;
    view.conversationsToggle.setAttribute('aria-expanded', 'true');
    view.conversationList.textContent = '';
    this.conversationsNote('Loading\u2026');
    // The server picks this conversation's course (or no course): a page filtering the newest 20 of all
    // the student's conversations would show an empty or short list beside many in other courses.
    var url = '/api/conversations?limit=20' +
      (this.courseId ? '&course_id=' + encodeURIComponent(this.courseId) : '&no_course=true');
    var base = this.options.apiBase || '';
    var asked = this.conversationsAsked = {};
    fetch(base + url, { headers: { Authorization: 'Bearer ' + this.token }, credentials: 'omit', cache: 'no-store' })
      .then(function (response) { return response.ok ? response.json() : null; })
      .catch(function () { return null; })
      .then(function (body) {
        if (asked !== self.conversationsAsked || view.conversations.hidden) return;
        var list = body && Array.isArray(body.conversations) ? body.conversations : null;
        if (!list) {
          self.conversationsNote('Your conversations could not be loaded. Try again in a moment.');
          return;
        }
        self.conversationsNote(list.length ? null : 'No conversations yet.');
        list.forEach(function (c) { view.conversationList.appendChild(self.conversationItem(c)); });
      });
  };

  Client.prototype.conversationsNote = function (text) {
    var note = this.view.conversationNote;
    note.hidden = !text;
    note.textContent = text || '';
  };

  Client.prototype.conversationItem = function (c) {
    var self = this;
    var title = typeof c.title === 'string' && c.title ? c.title : 'Untitled conversation';
    var when = new Date(c.updated_at);
    var date = isNaN(when.getTime()) ? '' : when.toLocaleString([], { dateStyle: 'medium', timeStyle: 'short' });
    var current = c.id === this.conversationId;
    var button = h('button', { type: 'button', className: 'se-conversation', 'data-id': c.id,
      'aria-current': current ? 'true' : null }, [
      h('span', { className: 'se-conversation__title', text: title }),
      h('span', { className: 'se-conversation__meta', text: current ? date + ' \u00b7 current' : date }),
    ]);
    button.addEventListener('click', function () { self.switchTo(c.id, title); });
    return h('li', null, [button]);
  };

  Client.prototype.closeConversations = function (focusToggle) {
    var view = this.view;
    this.conversationsAsked = null;
    view.conversations.hidden = true;
    view.conversationsToggle.setAttribute('aria-expanded', 'false');
    if (focusToggle) view.conversationsToggle.focus();
  };

  /* -- history ---------------------------------------------------------------------------------- */

  Client.prototype.loadOlder = function () {
    if (this.loadingOlder || !this.hasMore || !this.ready || this.oldestId == null) return;
    this.loadingOlder = true;
    this.view.older.disabled = true;
    this.view.older.textContent = 'Loading\u2026';
    this.transport.send({ type: 'history', conversation_id: this.conversationId, before: this.oldestId, limit: 20 });
  };

  // The button comes back after the page arrives, and also when it never will: the socket closed
  // (a history request is not resent), a new welcome, or an error frame not about a message.
  Client.prototype.olderLoaded = function () {
    this.loadingOlder = false;
    this.view.older.disabled = false;
    this.view.older.textContent = 'Load older messages';
  };

  Client.prototype.onHistory = function (f) {
    this.olderLoaded();
    var older = this.view.older;
    if (f.conversation_id && f.conversation_id !== this.conversationId) return;
    var messages = Array.isArray(f.messages) ? f.messages : [];
    var log = this.view.log;
    var before = log.scrollHeight - log.scrollTop;
    var first = this.view.list.firstChild;
    var lastQuestion = null;
    var self = this;
    var added = 0;
    messages.forEach(function (m) {
      if (typeof m.id !== 'number') return;
      if (self.oldestId == null || m.id < self.oldestId) self.oldestId = m.id;
      if (self.byServerId.has(m.id)) return;
      var item = self.makeItem(m);
      if (item.kind === 'user') lastQuestion = item.text;
      else if (item.kind === 'assistant') item.question = lastQuestion;
      self.register(item);
      self.render(item);
      self.view.list.insertBefore(item.li, first);
      added += 1;
    });
    this.hasMore = f.has_more === true && messages.length > 0;
    older.hidden = !this.hasMore;
    this.refreshEmpty();
    log.scrollTop = log.scrollHeight - before; // keep the message under the reader's eyes in place
    if (added) this.view.announce('Loaded ' + added + ' older messages.');
  };

  Client.prototype.onTeacherMessage = function (f) {
    if (f.conversation_id && f.conversation_id !== this.conversationId) return;
    if (typeof f.message_id !== 'number' || typeof f.text !== 'string' || this.byServerId.has(f.message_id)) return;
    var item = this.makeItem({ role: 'teacher', id: f.message_id, text: f.text, created_at: new Date().toISOString() });
    item.name = typeof f.name === 'string' ? f.name : '';
    var stick = this.view.nearBottom();
    this.append(item);
    if (stick) this.view.scrollToBottom();
    this.view.announce((item.name ? 'Your teacher ' + item.name : 'Your teacher') + ' wrote: ' + plainText(item.body));
    if (!this.visible) this.emit('unread');
  };

  Client.prototype.onAiState = function (paused, conversationId) {
    if (conversationId && conversationId !== this.conversationId) return;
    if (paused === this.aiPaused) return;
    this.aiPaused = paused;
    if (paused) {
      this.view.notice({ key: 'ai-paused', tone: 'info',
        text: 'Your teacher has paused the AI tutor. You can still write: your teacher sees your messages.' });
    } else {
      this.view.clearNotice('ai-paused');
    }
  };

  Client.prototype.onServerMessage = function (f) {
    // Newer servers may push messages (for instance a teacher's note) as {type:"message", message:{...}}.
    var m = f.message && typeof f.message === 'object' ? f.message : f;
    if (typeof m.id !== 'number' || typeof m.text !== 'string' || this.byServerId.has(m.id)) return;
    if ((f.conversation_id || m.conversation_id) && (f.conversation_id || m.conversation_id) !== this.conversationId) return;
    var item = this.makeItem(m);
    item.announced = true;
    var stick = this.view.nearBottom();
    this.append(item);
    if (stick) this.view.scrollToBottom();
    if (item.kind === 'teacher') this.view.announce('Your teacher wrote: ' + plainText(item.body));
  };

  /* -- errors ----------------------------------------------------------------------------------- */

  Client.prototype.onError = function (f) {
    this.handleError(f);
    this.updateStop();
  };

  Client.prototype.handleError = function (f) {
    var code = f.code;
    var ref = typeof f.ref === 'string' ? f.ref : null;
    var item = ref ? this.byClientId.get(ref) : null;
    if (item && item.kind !== 'user') item = null;
    if (!item) this.olderLoaded(); // errors about a history request carry no message's ref
    var view = this.view;
    var self = this;
    var retried = ref ? this.regenerating.get(ref) : null;
    if (retried) {
      this.regenerating.delete(ref);
      retried.retried = false;
      this.render(retried);
      if (code === 'forbidden') { // the teacher paused the tutor before this socket heard of it
        view.notice({ key: 'ai-paused-retry', tone: 'info', text: PAUSED_RETRY, ttl: 15000 });
        return;
      }
    }
    if (code === 'not_found' && !this.ready && this.conversationId) {
      // The remembered conversation is gone (or belongs to someone else): start from the default one.
      this.conversationId = null;
      this.everWelcomed = false;
      this.switchedTo = null;
      storageSet(this.storageKey, null);
      this.sendHello();
      return;
    }
    if (code === 'internal' && !this.ready && !ref) {
      // The hello failed on a dependency (the database restarting): said again on this socket instead of
      // waiting for the server's hello deadline to close it.
      this.transport.helloAgain(seconds(f.retry_after, 1), function () { self.sendHello(); });
      view.setStatus('connecting');
      return;
    }
    if (code === 'rate_limited' || (code === 'quota_exceeded' && seconds(f.retry_after, 30) <= 120)) {
      var wait = seconds(f.retry_after, 10);
      this.rateUntil = Math.max(this.rateUntil, Date.now() + wait * 1000);
      if (item) {
        item.status = 'held';
        if (this.outbox.indexOf(item) < 0) this.outbox.unshift(item);
        this.render(item);
      }
      view.notice({
        key: 'rate', tone: 'warn', until: this.rateUntil,
        text: code === 'rate_limited' ? 'You\u2019re sending messages quickly. Your message will be sent in'
          : 'The tutor needs a short break. Your message will be sent in',
        srText: 'Too many messages. Your message will be sent automatically in about ' + wait + ' seconds.',
        onEnd: function () { self.flushOutbox(false); },
      });
      this.flushOutbox(false);
      return;
    }
    if (f.retryable === false && ref && /^ai_(unavailable|declined|rejected)$/.test(code)) {
      var failed = this.byServerId.get(Number(ref));
      if (failed && failed.kind === 'assistant' && !failed.noRetry) {
        outcome(failed, { error: code, retryable: false });
        this.render(failed);
      }
    }
    if (item && (code === 'ai_unavailable' || code === 'internal') && f.retryable !== false && (item.attempts || 0) < 3) {
      // Transient (the server is restarting or a dependency hiccuped): send the same id again shortly.
      item.attempts = (item.attempts || 0) + 1;
      item.status = 'held';
      this.render(item);
      setTimeout(function () {
        if (item.status === 'held') { item.status = 'queued'; self.flushOutbox(false); }
      }, seconds(f.retry_after, 2) * 1000);
      return;
    }
    var friendly = {
      too_large: 'That message is too long. Please shorten it and send it again.',
      bad_request: 'That message could not be sent.',
      forbidden: 'You don\u2019t have access to this course. Ask your teacher for help.',
      unauthorized: this.options.mode === 'embed' ? 'Signing you in again\u2026'
        : 'Your sign-in has expired. Open the tutor again from your school\u2019s site.',
      not_found: 'That conversation or message no longer exists.',
      quota_exceeded: 'You\u2019ve used your tutor time for now.',
      ai_unavailable: f.retryable === false
        ? 'The tutor is unavailable at the moment. Your school\u2019s staff have been told.'
        : 'The tutor is unavailable right now. Please try again in a moment.',
      ai_declined: 'The tutor can\u2019t answer that question. Try asking about your course in another way.',
      ai_rejected: 'The tutor could not process this conversation. Your teacher can see that this answer failed.',
      internal: 'Something went wrong on our side.',
      busy: 'Many students are connecting right now. Trying again in a moment\u2026',
    };
    if (item) {
      item.status = 'rejected';
      item.reason = code === 'too_large' ? 'too long' : code === 'quota_exceeded' ? 'limit reached' : 'error';
      var at = this.outbox.indexOf(item);
      if (at >= 0) this.outbox.splice(at, 1);
      this.render(item);
      this.updateStop();
    }
    if (code === 'unauthorized' || code === 'forbidden') {
      view.notice({ key: code, tone: code === 'unauthorized' && this.options.mode === 'embed' ? 'warn' : 'error',
        text: friendly[code] });
      return;
    }
    var text = friendly[code] || 'Something went wrong.';
    if (code === 'quota_exceeded' && f.retry_after) {
      text += ' Try again in about ' + Math.ceil(f.retry_after / 60) + ' min.';
    }
    var logRef = typeof f.log_ref === 'string' ? f.log_ref : null;
    if (code === 'internal' && logRef) text += ' (reference ' + logRef.slice(0, 24) + ')';
    var spec = { key: code, tone: /^ai_|^busy$/.test(code) ? 'warn' : 'error', text: text, ttl: 15000 };
    if (code === 'ai_unavailable' && f.retry_after && f.retryable !== false) {
      spec.until = Date.now() + seconds(f.retry_after, 5) * 1000;
      spec.text = 'The tutor is unavailable right now. Try again in';
      spec.srText = 'The tutor is unavailable right now. Try again in about ' + seconds(f.retry_after, 5) + ' seconds.';
    }
    view.notice(spec);
  };

  /* ---- bootstrapping --------------------------------------------------------------------------- */

  function applyTheme(root, vars) {
    if (!vars || typeof vars !== 'object') return;
    Object.keys(vars).forEach(function (name) {
      var value = vars[name];
      if (!/^--smartedu-[a-z0-9-]{1,40}$/.test(name) || typeof value !== 'string' || value.length > 100) return;
      if (/[;{}<>\\]|url\(/i.test(value)) return;
      root.style.setProperty(name, value.trim()); // CSSOM: allowed under style-src 'self'
    });
  }

  function readFragment() {
    var params = new URLSearchParams(location.hash.replace(/^#/, ''));
    var token = params.get('token');
    if (token) {
      params.delete('token');
      var rest = params.toString();
      // Take the token out of the address bar (and so out of bookmarks and screenshots).
      history.replaceState(history.state, '', location.pathname + location.search + (rest ? '#' + rest : ''));
    }
    return { token: token, course: params.get('course'), conversation: params.get('conversation') };
  }

  function boot() {
    var root = document.querySelector('[data-smartedu-chat]');
    if (!root || root.getAttribute('data-started')) return;
    root.setAttribute('data-started', 'true');
    common.reloadOnNewToken();
    var mode = root.getAttribute('data-mode') === 'embed' ? 'embed' : 'page';
    var fragment = readFragment();
    var query = new URLSearchParams(location.search);
    var theme = query.get('theme');
    if (theme === 'light' || theme === 'dark') document.documentElement.setAttribute('data-theme', theme);
    // ?dir= lays the page out right to left (the widget passes its host page's direction); ?lang= is the
    // language of the messages and the composer, a BCP 47 tag.
    var dir = query.get('dir');
    if (dir === 'rtl' || dir === 'ltr') document.documentElement.dir = dir;
    var lang = query.get('lang');
    if (!lang || lang.length > 35 || !/^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*$/.test(lang)) lang = null;
    var parentOrigin = null;
    var client = new Client(root, {
      mode: mode,
      token: fragment.token,
      tokenFromUrl: Boolean(fragment.token),
      course: fragment.course || query.get('course'),
      conversationId: fragment.conversation,
      lang: lang,
      onEvent: function (name, detail) {
        if (mode !== 'embed' || window.parent === window) return;
        var message = { type: 'smartedu:' + name };
        Object.keys(detail).forEach(function (k) { message[k] = detail[k]; });
        window.parent.postMessage(message, parentOrigin || '*'); // these messages carry no secrets
      },
    });
    ns.client = client;
    if (mode === 'embed') {
      var meta = document.querySelector('meta[name="smartedu-parent-origin"]');
      var expectedOrigin = meta && meta.content ? meta.content : null;
      window.addEventListener('message', function (event) {
        if (event.source !== window.parent || window.parent === window) return;
        if (expectedOrigin && event.origin !== expectedOrigin) return;
        var data = event.data;
        if (!data || typeof data !== 'object' || typeof data.type !== 'string') return;
        parentOrigin = event.origin;
        if (data.type === 'smartedu:token' && typeof data.token === 'string' && data.token.length < 8192) {
          client.setToken(data.token);
        } else if (data.type === 'smartedu:theme') {
          applyTheme(document.documentElement, data.vars);
          if (data.scheme === 'light' || data.scheme === 'dark') document.documentElement.setAttribute('data-theme', data.scheme);
        } else if (data.type === 'smartedu:visible') {
          client.visible = data.open === true;
          if (client.visible) client.view.input.focus();
        }
      });
      document.addEventListener('keydown', function (event) {
        if (event.key === 'Escape') client.emit('close');
      });
      client.visible = false;
      client.emit('ready-for-token');
    } else if (!fragment.token) {
      client.signedOut = true;
      client.view.setStatus('signed-out');
      client.view.notice({ key: 'unauthorized', tone: 'error',
        text: 'This page needs a sign-in link. For your safety the sign-in token is removed from the address bar, ' +
          'so reloading signs you out: open the tutor again from your school\u2019s site.' });
      client.view.input.disabled = true;
      return;
    }
    client.start();
  }

  ns.Client = Client;
  ns.renderMarkdown = ns.renderMarkdown || function (text) { return document.createTextNode(text); };
  ns.MarkdownStream = ns.MarkdownStream || function (body) { this.render = function (text) { body.textContent = text; }; };
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', boot);
  else boot();
})();
