/* SmartEdu Tutor Chat: what the chat client (chat.js, for /chat and /embed) and the teacher dashboard
 * (teacher.js) share: id and DOM helpers, and Socket, one WebSocket at a time that reconnects with
 * capped exponential backoff and jitter and sends heartbeats. Loaded before either of them.
 */
(function () {
  'use strict';

  var ns = (window.SmartEdu = window.SmartEdu || {});
  var PING_EVERY_MS = 20000;
  var WELCOME_LIMIT_MS = 15000;
  var BACKOFF_BASE_MS = 500;
  var BACKOFF_CAP_MS = 30000;
  // Close code 1013: the server shed this client for falling behind (server/peer.py), not because it is
  // failing. Such a client comes back at once and resumes; a second shed within this window backs off.
  var SLOW_CLOSE = 1013;
  var SHED_AGAIN_MS = 10000;

  /* ---- helpers --------------------------------------------------------------------------------- */

  function newId() {
    if (window.crypto && typeof window.crypto.randomUUID === 'function') return window.crypto.randomUUID();
    var bytes = new Uint8Array(16);
    if (window.crypto && window.crypto.getRandomValues) {
      window.crypto.getRandomValues(bytes);
    } else {
      for (var i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
    }
    return Array.prototype.map.call(bytes, function (b) { return (b + 256).toString(16).slice(1); }).join('');
  }

  // Offsets and lengths in the protocol count code points, not UTF-16 units.
  function cpLength(s) { return Array.from(s).length; }
  function cpSlice(s, from) { return Array.from(s).slice(from).join(''); }

  function h(tag, props, children) {
    var node = document.createElement(tag);
    if (props) {
      Object.keys(props).forEach(function (key) {
        var value = props[key];
        if (value == null || value === false) return;
        if (key === 'className') node.className = value;
        else if (key === 'text') node.textContent = value;
        else if (key === 'hidden') node.hidden = true;
        else node.setAttribute(key, value === true ? '' : String(value));
      });
    }
    (children || []).forEach(function (child) {
      if (child) node.appendChild(typeof child === 'string' ? document.createTextNode(child) : child);
    });
    return node;
  }

  function formatTime(iso) {
    var d = iso ? new Date(iso) : new Date();
    if (isNaN(d.getTime())) return '';
    return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  }

  // A sign-in link opened again in a tab already showing the page (a school's site reusing a named window)
  // changes only the fragment: the page is not loaded again, so the new token would stay unread in the
  // address bar and the history. Loading the page again reads it like the first time, and takes it out.
  function reloadOnNewToken() {
    window.addEventListener('hashchange', function () {
      if (new URLSearchParams(location.hash.replace(/^#/, '')).has('token')) location.reload();
    });
  }

  /* ---- Pacer ----------------------------------------------------------------------------------- */

  // Renders what changed at most once an animation frame (hidden tabs get none: a timer instead). Frame
  // and timer ids are separate counters, so each is cancelled by its own kind: clearTimeout with a
  // frame's id would cancel whatever timer has the same number (a heartbeat, a resend, a notice's).
  var HIDDEN_RENDER_MS = 250;

  function Pacer(render) {
    this.render = render;
    this.frame = 0;
    this.timer = 0;
  }

  Pacer.prototype.request = function () {
    if (this.frame || this.timer) return;
    var self = this;
    var run = function () { self.flush(); };
    if (document.hidden) this.timer = setTimeout(run, HIDDEN_RENDER_MS);
    else this.frame = requestAnimationFrame(run);
  };

  // Render now (an answer that ended is shown whole at once), instead of at the requested time.
  Pacer.prototype.flush = function () {
    if (this.frame) cancelAnimationFrame(this.frame);
    if (this.timer) clearTimeout(this.timer);
    this.frame = this.timer = 0;
    this.render();
  };

  /* ---- Socket ---------------------------------------------------------------------------------- */

  function Socket(url, hooks) {
    this.url = url;
    this.hooks = hooks; // onOpen(), onFrame(frame), onClose(code) -> 'stop' | delay ms | undefined, onState(state, untilMs)
    this.ws = null;
    this.attempt = 0;
    this.timer = null;
    this.ticker = null;
    this.pinger = null;
    this.lastRx = 0;
    this.pingedAt = 0;
    this.stopped = true;
    this.welcomed = false;
    this.connections = 0;
    this.shedAt = 0;
    var self = this;
    window.addEventListener('online', function () { if (!self.stopped) { self.attempt = 0; self.connect(); } });
    window.addEventListener('offline', function () { if (!self.stopped) self.detach('offline'); });
    document.addEventListener('visibilitychange', function () {
      if (!document.hidden && !self.stopped && !self.ws && self.timer) self.connect();
    });
  }

  Socket.prototype.start = function () {
    this.stopped = false;
    this.attempt = 0;
    this.connect();
  };

  Socket.prototype.state = function (state, until) {
    this.hooks.onState(state, until || 0);
  };

  Socket.prototype.clearTimers = function () {
    clearTimeout(this.timer);
    clearInterval(this.ticker);
    this.timer = this.ticker = null;
  };

  Socket.prototype.connect = function () {
    this.clearTimers();
    if (this.stopped || this.ws) return;
    if (navigator.onLine === false) {
      this.state('offline');
      return;
    }
    this.state('connecting');
    var self = this;
    var ws;
    try {
      ws = new WebSocket(this.url);
    } catch (e) {
      this.retry();
      return;
    }
    this.ws = ws;
    this.welcomed = false;
    this.connections += 1;
    ws.onopen = function () {
      if (self.ws !== ws) return;
      self.lastRx = Date.now();
      self.pingedAt = 0;
      self.hooks.onOpen();
      clearInterval(self.pinger);
      self.pinger = setInterval(function () { self.heartbeat(ws); }, PING_EVERY_MS);
      self.timer = setTimeout(function () { if (self.ws === ws && !self.welcomed) self.detach(); }, WELCOME_LIMIT_MS);
    };
    ws.onmessage = function (event) {
      if (self.ws !== ws || typeof event.data !== 'string') return;
      self.lastRx = Date.now();
      var frame;
      try { frame = JSON.parse(event.data); } catch (e) { return; }
      if (frame && typeof frame === 'object' && typeof frame.type === 'string') self.hooks.onFrame(frame);
    };
    ws.onclose = function (event) {
      if (self.ws !== ws) return;
      self.ws = null;
      clearInterval(self.pinger);
      var decision = self.hooks.onClose(event.code);
      if (decision === 'stop') self.stop();
      else if (event.code === SLOW_CLOSE && self.welcomed && decision === undefined && self.shed()) self.connect();
      else self.retry(typeof decision === 'number' ? decision : undefined);
    };
    ws.onerror = function () { /* a close event follows */ };
  };

  // A socket that let a whole ping interval pass without a single frame is dead. Measured from the
  // previous ping, not the clock, because background tabs run timers only once a minute.
  Socket.prototype.heartbeat = function (ws) {
    if (this.ws !== ws) return;
    if (this.pingedAt && this.lastRx < this.pingedAt) {
      this.detach();
      return;
    }
    this.pingedAt = Date.now();
    this.send({ type: 'ping' });
  };

  // Forget the socket now (a dead TCP connection can take minutes to report its close).
  Socket.prototype.detach = function (state, delay) {
    var ws = this.ws;
    this.ws = null;
    clearInterval(this.pinger);
    this.clearTimers();
    if (ws) {
      ws.onclose = ws.onmessage = ws.onopen = null;
      try { ws.close(4000, 'client reconnect'); } catch (e) { /* already closing */ }
    }
    this.hooks.onClose(0);
    if (state === 'offline') this.state('offline');
    else this.retry(delay);
  };

  // True when a close for falling behind may reconnect at once: the first one in SHED_AGAIN_MS. The
  // backoff's attempt count is left alone (this is no failure of the server).
  Socket.prototype.shed = function () {
    var now = Date.now();
    var first = now - this.shedAt > SHED_AGAIN_MS;
    this.shedAt = now;
    return first;
  };

  // A hello the server could not serve (a dependency failed, e.g. the database restarting; the socket
  // still waits for one): `send` it again on this same connection after `seconds`, jittered so that a class
  // does not come back in lockstep, unless the socket was welcomed or replaced meanwhile.
  Socket.prototype.helloAgain = function (seconds, send) {
    var self = this;
    var connection = this.connections;
    setTimeout(function () {
      if (!self.welcomed && self.connections === connection && self.ws) send();
    }, Math.min(Math.max(seconds, 0.2), 30) * (1 + Math.random()) * 1000);
  };

  Socket.prototype.welcome = function () {
    this.welcomed = true;
    this.attempt = 0;
    this.clearTimers();
    this.state('online');
  };

  Socket.prototype.retry = function (delay) {
    if (this.stopped) return;
    if (delay === undefined) {
      var ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, this.attempt));
      this.attempt = Math.min(this.attempt + 1, 16);
      delay = ceiling / 2 + Math.random() * ceiling / 2; // "equal jitter": never zero, never in lockstep
    }
    this.clearTimers();
    var until = Date.now() + delay;
    var self = this;
    this.state('reconnecting', until);
    this.ticker = setInterval(function () { self.state('reconnecting', until); }, 1000);
    this.timer = setTimeout(function () { self.connect(); }, delay);
  };

  Socket.prototype.reconnectNow = function () {
    if (this.stopped) this.stopped = false;
    this.attempt = 0;
    if (!this.ws) this.connect();
  };

  Socket.prototype.stop = function () {
    this.stopped = true;
    this.clearTimers();
    clearInterval(this.pinger);
    var ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onopen = null;
      try { ws.close(1000, 'bye'); } catch (e) { /* ignore */ }
    }
  };

  Socket.prototype.send = function (frame) {
    if (!this.ws || this.ws.readyState !== 1) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  };

  ns.common = {
    newId: newId, cpLength: cpLength, cpSlice: cpSlice, h: h, formatTime: formatTime, Socket: Socket, Pacer: Pacer,
    reloadOnNewToken: reloadOnNewToken,
  };
})();
